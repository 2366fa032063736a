"""Per-image prompt processing, Fooocus 2.5's way (torch-free).

For each image of a task: split the prompts into lines (line 1 main, the others extra prompts),
pull `<lora:NAME:WEIGHT>` tags out of the main line, expand wildcards `__name__` and arrays
`[[a,b]]`, apply the selected styles, and say which texts CLIP encodes separately (the
"workloads", concatenated along the token axis) and how many of them the pooled vector sums.

Order (one task, image i, seed s_i = the image's seed):
  1. lines: safe_str each line, drop empty ones; empty main prompt -> no expansion
  2. main positive line: LoRA tags removed, then the comma clean-up
  3. rng = random.Random(s_i)
  4. wildcards: main positive, main negative, each extra positive, each extra negative (one rng)
  5. arrays on the main positive only (by image index)
  6. styles in selection order ("Random Style" draws from the same rng), then the user's
     negative line, then the extra lines; the expansion text (GPT-2, elsewhere) is appended last.
"""
from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import presets
from .styles import EXPANSION_STYLE, RANDOM_STYLE, StyleLibrary, files_in_fooocus_order

SEED_MODULUS = presets.SEED_MODULUS  # task seeds live in [0, 2**63)
EXPANSION_SEED_MODULUS = 2**32  # the expansion seeds numpy through transformers.set_seed
WILDCARDS_MAX_DEPTH = 64  # rounds of re-scanning replaced text for nested wildcards
MAX_LORAS = 5  # Fooocus's default_max_lora_number

WILDCARD_PATTERN = re.compile(r"__([\w-]+)__")
ARRAY_PATTERN = re.compile(r"\[\[(.*?)\]\]")
LORA_TAG_PATTERN = re.compile(r"(<lora:([^:]+):([+-]?(?:\d+(?:\.\d*)?|\.\d+))>)")


# Text clean-up


def safe_str(text: str) -> str:
    """Fooocus's per-line clean-up: double spaces collapsed (16 passes), then leading/trailing
    commas, periods, spaces, CR and LF stripped."""
    text = str(text)
    for _ in range(16):
        text = text.replace("  ", " ")
    return text.strip(",. \r\n")


def remove_empty(items: Sequence[str], default: str | None = None) -> list[str]:
    """The non-empty strings; [default] when none is left and a default is given."""
    out = [x for x in items if x != ""]
    if not out and default is not None:
        return [default]
    return out


def prompt_lines(text: str | None) -> list[str]:
    """A prompt field's lines after safe_str, empty ones dropped; at least [""]."""
    return remove_empty([safe_str(line) for line in (text or "").splitlines()], default="")


def cleanup_prompt(text: str) -> str:
    """Spaces and commas collapsed, split on commas, pieces stripped, empty ones dropped, rejoined
    with ", " (Fooocus applies this to the main line whether or not it had LoRA tags)."""
    text = re.sub(" +", " ", text)
    text = re.sub(",+", ",", text)
    return ", ".join(piece.strip() for piece in text.split(",") if piece.strip())


# LoRA tags


@dataclass(frozen=True)
class LoraTag:
    name: str  # the file stem as written in the tag
    weight: float


def extract_lora_tags(prompt: str) -> tuple[list[LoraTag], str]:
    """(tags in prompt order, the prompt without them, cleaned up). A tag is `<lora:NAME:WEIGHT>`
    with NAME free of ':' and WEIGHT a plain decimal number (sign allowed)."""
    tags: list[LoraTag] = []
    pieces: list[str] = []
    for piece in prompt.split(","):
        for whole, name, weight in LORA_TAG_PATTERN.findall(piece):
            tags.append(LoraTag(name, float(weight)))
            piece = piece.replace(whole, "")
        pieces.append(piece)
    return tags, cleanup_prompt(", ".join(pieces) + ", ")


def merge_prompt_loras(loras: Sequence[tuple[str, float]], tags: Sequence[LoraTag],
                       lora_filenames: Sequence[str], limit: int = MAX_LORAS) -> list[tuple[str, float]]:
    """Fooocus's rule for adding prompt LoRAs to the request's (enabled) LoRAs: a tag's NAME is
    matched against the stems of `lora_filenames` (first match; no match -> ignored); a file
    already among `loras`, or a repeated (file, weight), is skipped. If nothing new is found the
    request's list is returned unchanged; otherwise "None" entries are dropped, the new ones
    appended, and the list cut to `limit`."""
    found = []
    for tag in tags:
        match = next((f for f in lora_filenames if Path(f).stem == tag.name), None)
        if match is not None:
            found.append((match, tag.weight))
    names = [name for name, _ in loras]
    new: list[tuple[str, float]] = []
    for item in found:
        if item[0] in names or item in new:
            continue
        new.append(item)
    if not new:
        return list(loras)
    return [x for x in [*loras, *new] if x[0] != "None"][:limit]


# Wildcards and arrays


class WildcardLibrary:
    """Wildcard name -> choices. Built from a folder of NAME.txt files (sub-folders included; the
    first file in Fooocus's listing order wins a name) or from a mapping (tests). A file is read
    each time it is used, as Fooocus does; its choices are its non-empty lines."""

    def __init__(self, entries: Mapping[str, Sequence[str] | str | Path]):
        self._entries = dict(entries)

    @classmethod
    def from_dir(cls, folder: str | Path | None) -> WildcardLibrary | None:
        if folder is None or not Path(folder).is_dir():
            return None
        entries: dict[str, Path] = {}
        for rel in files_in_fooocus_order(folder, ".txt"):
            stem = os.path.splitext(os.path.basename(rel))[0]
            entries.setdefault(stem, Path(folder) / rel)
        return cls(entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def choices(self, name: str) -> list[str] | None:
        """The non-empty lines for `name`; None when it is unknown, unreadable or empty."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        try:
            if isinstance(entry, (str, Path)):
                with open(entry, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            else:
                lines = list(entry)
        except OSError:
            return None
        lines = [x for x in lines if x != ""]
        return lines or None


def apply_wildcards(text: str, rng: random.Random, index: int, in_order: bool,
                    wildcards: WildcardLibrary | None) -> str:
    """Replace `__name__` placeholders, Fooocus's way. Each round finds every placeholder in the
    text and replaces, one by one, the first remaining occurrence of each by `rng.choice(lines)`
    (or lines[index % len] with `in_order`); a replacement may bring new placeholders, scanned in
    the next round, up to 64 rounds. An unknown or empty wildcard is replaced, every occurrence at
    once, by its bare name (no rng draw)."""
    for _ in range(WILDCARDS_MAX_DEPTH):
        placeholders = WILDCARD_PATTERN.findall(text)
        if not placeholders:
            return text
        for name in placeholders:
            lines = wildcards.choices(name) if wildcards is not None else None
            if lines is None:
                text = text.replace(f"__{name}__", name)
            elif in_order:
                text = text.replace(f"__{name}__", lines[index % len(lines)], 1)
            else:
                text = text.replace(f"__{name}__", rng.choice(lines), 1)
    return text


def apply_arrays(text: str, index: int) -> str:
    """Replace each `[[a,b,c]]` (non-greedy; items split on ',' and not trimmed) by one item: the
    image index, modulo the product of the array sizes, read as a mixed-radix number with the
    first array's digit varying fastest."""
    arrays = ARRAY_PATTERN.findall(text)
    if not arrays:
        return text
    sizes = [len(a.split(",")) for a in arrays]
    total = 1
    for n in sizes:
        total *= n
    rest = index % total
    for body, n in zip(arrays, sizes):
        text = text.replace(f"[[{body}]]", body.split(",")[rest % n], 1)
        rest //= n
    return text


# The plan for one image


@dataclass(frozen=True)
class PromptPlan:
    """What one image's prompts become.

    `positive` / `negative` are the workload texts, each CLIP-encoded on its own and concatenated
    along the token axis; the pooled vector is the sum over the first `positive_top_k` /
    `negative_top_k` of them. With `use_expansion`, the expansion text (GPT-2 on
    `expansion_prompt` with `expansion_seed`) is added by `with_expansion` as the last positive
    text, outside the pooled sum."""

    seed: int
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    positive_top_k: int
    negative_top_k: int
    use_expansion: bool
    expansion_prompt: str  # the main prompt after wildcards and arrays, unstyled
    expansion_seed: int
    lora_tags: tuple[LoraTag, ...]
    task_prompt: str
    task_negative_prompt: str
    styles: tuple[str, ...]  # for metadata: "Fooocus V2" first if expanding, Random Style resolved
    log_prompt: str  # Fooocus's logged "Prompt": main + extra positive lines, after wildcards
    log_negative_prompt: str
    expansion: str | None = None

    def with_expansion(self, expansion: str) -> PromptPlan:
        return replace(self, expansion=expansion)

    @property
    def positive_texts(self) -> list[str]:
        """The texts to encode for the positive side (the expansion last, when set)."""
        return [*self.positive, *([self.expansion] if self.expansion is not None else [])]

    @property
    def negative_texts(self) -> list[str]:
        return list(self.negative)

    # Metadata (pipeline.metadata.image_info keyword arguments)

    @property
    def full_prompt(self) -> list[str]:
        return self.positive_texts

    @property
    def full_negative_prompt(self) -> list[str]:
        return self.negative_texts

    @property
    def prompt_expansion(self) -> str:
        return self.expansion or ""


def selected_styles(task_fields: Mapping, styles: StyleLibrary) -> tuple[list[str], bool]:
    """(styles to apply in selection order, whether "Fooocus V2" was selected). A missing
    `style_selections` means Fooocus's defaults; names the library does not know are dropped;
    "Fooocus V2" is taken out (every occurrence) and turns on the expansion."""
    selection = task_fields.get("style_selections")
    selection = list(presets.STYLE_DEFAULTS if selection is None else selection)
    legal = [s for s in selection if isinstance(s, str) and styles.is_legal(s)]
    return [s for s in legal if s != EXPANSION_STYLE], EXPANSION_STYLE in legal


def _flag(task_fields: Mapping, key: str) -> bool:
    value = task_fields.get(key)
    if value is None:
        value = (task_fields.get("advanced_params") or {}).get(key)
    return bool(value)


def process_prompts(task_fields: Mapping, image_index: int, seed: int,
                    styles: StyleLibrary | None = None,
                    wildcards: WildcardLibrary | None = None) -> PromptPlan:
    """The prompt plan of image `image_index` of a task.

    task_fields: the request's fields by their Fooocus-API names (prompt, negative_prompt,
    style_selections, read_wildcards_in_order; the last may also sit in advanced_params).
    seed: this image's seed, i.e. (image_seed + index) mod 2**63, or the seed itself with
    disable_seed_increment (GenerationTask.image_seeds()[image_index]).
    styles: None -> the built-in library. wildcards: None -> every `__name__` becomes `name`."""
    styles = styles if styles is not None else StyleLibrary.builtin()
    seed = int(seed) % SEED_MODULUS
    style_list, use_expansion = selected_styles(task_fields, styles)
    use_style = len(style_list) > 0
    in_order = _flag(task_fields, "read_wildcards_in_order")

    positives = prompt_lines(task_fields.get("prompt"))
    negatives = prompt_lines(task_fields.get("negative_prompt"))
    prompt, negative_prompt = positives[0], negatives[0]
    if prompt == "":
        use_expansion = False
    extra_positive, extra_negative = positives[1:], negatives[1:]
    lora_tags, prompt = extract_lora_tags(prompt)

    rng = random.Random(seed)
    task_prompt = apply_wildcards(prompt, rng, image_index, in_order, wildcards)
    task_prompt = apply_arrays(task_prompt, image_index)
    task_negative = apply_wildcards(negative_prompt, rng, image_index, in_order, wildcards)
    task_extra_positive = [apply_wildcards(p, rng, image_index, in_order, wildcards) for p in extra_positive]
    task_extra_negative = [apply_wildcards(p, rng, image_index, in_order, wildcards) for p in extra_negative]

    positive: list[str] = []
    negative: list[str] = []
    task_styles = list(style_list)
    if use_style:
        placeholder_used = False
        for j, name in enumerate(task_styles):
            if name == RANDOM_STYLE:
                name = styles.random_style(rng)
                task_styles[j] = name
            p, n, has_placeholder = styles.apply(name, task_prompt)
            placeholder_used = placeholder_used or has_placeholder
            positive += p
            negative += n
        if not placeholder_used:
            positive = [task_prompt] + positive
    else:
        positive.append(task_prompt)
    negative.append(task_negative)  # the user's negative is always a workload of its own
    positive = remove_empty(positive + task_extra_positive, default=task_prompt)
    negative = remove_empty(negative + task_extra_negative, default=task_negative)

    return PromptPlan(
        seed=seed,
        positive=tuple(positive),
        negative=tuple(negative),
        positive_top_k=len(positive),
        negative_top_k=len(negative),
        use_expansion=use_expansion,
        expansion_prompt=task_prompt,
        expansion_seed=seed % EXPANSION_SEED_MODULUS,
        lora_tags=tuple(lora_tags),
        task_prompt=task_prompt,
        task_negative_prompt=task_negative,
        styles=tuple(([EXPANSION_STYLE] if use_expansion else []) + task_styles),
        log_prompt="\n".join([task_prompt, *task_extra_positive]),
        log_negative_prompt="\n".join([task_negative, *task_extra_negative]),
    )
