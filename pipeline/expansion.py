"""Fooocus V2 prompt expansion (Fooocus extras/expansion.py), over the `prompt_expansion` leaf.

For one image: the main prompt (after wildcards and arrays, unstyled) goes through `safe_str`
and gets a trailing ","; with n its token count, exactly 75*ceil(n/75) - n tokens are sampled
(none when n is a multiple of 75: the prompt comes back without the ","). Each step calls the
GPT-2 leaf on the whole sequence (no KV cache) and takes the last position's logits; every token
outside the allowed words gets -8192, as does every token already in the sequence, except the
comma, which stays allowed; then top-k 100 sampling at temperature 1 with a torch.Generator
seeded by the image seed mod 2**32. The result is the decoded sequence (prompt + new tokens)
through `safe_str`, e.g. "a cat, intricate, elegant, highly detailed".

Fooocus's model is GPT-2 small on GPT-2's vocabulary with its 642-word `positive.txt`; exported
from Fooocus's folder (export.expansion) the pipeline model's folder holds its tokenizer as
`expansion_tokenizer.json` and the words as `expansion_words.txt`. The tiny default's GPT-2 reuses
CLIP's tokenizer and vocabulary, and its allowed words are this project's own list
(`expansion_words.txt` here, or any file with one word per line). Words that are not a single
token of the tokenizer are skipped, as Fooocus's list only holds single-token words.

Deviation: Fooocus draws from transformers' sampler seeded by `set_seed`; the draws here come from
torch's generator, so the same seed gives the same text here but not Fooocus's text.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .interfaces import PROMPT_EXPANSION
from .prompts import safe_str
from .text import byte_unicode_pairs

NEG_INF = -8192.0  # Fooocus's bias for banned tokens
TOP_K = 100
BUDGET = 75  # the expansion fills the prompt up to the next multiple of 75 tokens
SEED_MODULUS = 2**32
DEFAULT_WORDS_FILE = Path(__file__).with_name("expansion_words.txt")
TOKENIZER_FILE = "expansion_tokenizer.json"  # beside the pipeline's tokenizer.json (export.expansion writes it)

log = logging.getLogger(__name__)
_warned: set[str] = set()


def read_words(path: str | Path | None = None) -> list[str]:
    """Allowed words from a file, one per line (lower-cased; blank lines and `#` comments skipped)."""
    text = Path(path or DEFAULT_WORDS_FILE).read_text(encoding="utf-8")
    words = []
    for line in text.splitlines():
        word = line.strip().lower()
        if word and not word.startswith("#") and word not in words:
            words.append(word)
    return words


class ExpansionTokenizer:
    """The expansion model's tokenizer over a `tokenizers` tokenizer.json: CLIP's BPE (words end
    in `</w>`) or GPT-2's byte-level BPE (words start with `Ġ`), without special tokens."""

    def __init__(self, tokenizer_json: str | Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._bytes = {c: b for b, c in byte_unicode_pairs()}

    def ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def word_token(self, word: str) -> int | None:
        """The single token of a space-separated word, or None when the word takes several."""
        for token in (word + "</w>", "Ġ" + word):
            tid = self._tok.token_to_id(token)
            if tid is not None:
                return tid
        ids = self.ids(" " + word)
        return ids[0] if len(ids) == 1 else None

    def comma(self) -> int:
        return self.ids(",")[-1]

    def decode(self, ids: Iterable[int]) -> str:
        text = "".join(self._tok.id_to_token(int(i)) or "" for i in ids)
        text = text.replace("</w>", " ")
        raw = bytes(self._bytes.get(ch, ord(" ")) for ch in text)
        return re.sub(r" +([,.])", r"\1", raw.decode("utf-8", errors="replace"))  # CLIP: "cat , x" -> "cat, x"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def load_expansion_tokenizer(pipeline_dir: str | Path, vocab: int) -> ExpansionTokenizer | None:
    """The expansion model's tokenizer from a pipeline model's folder: `expansion_tokenizer.json`,
    else the CLIP `tokenizer.json` (the tiny default's GPT-2 is on CLIP's vocabulary). None, with a
    warning (once per folder), when its vocabulary is not the model's `vocab`: the expansion is
    then off (the exporter refuses such exports; this is a repository written some other way)."""
    folder = Path(pipeline_dir)
    path = folder / TOKENIZER_FILE
    path = path if path.exists() else folder / "tokenizer.json"
    tokenizer = ExpansionTokenizer(path)
    if tokenizer.vocab_size == vocab:
        return tokenizer
    if str(folder) not in _warned:
        _warned.add(str(folder))
        log.warning("Fooocus V2 prompt expansion is off: the prompt_expansion model has a %d-token vocabulary "
                    "but %s has %d tokens (export the expansion folder with its tokenizer: python -m export "
                    "expansion FOLDER --onnx DIR)", vocab, path, tokenizer.vocab_size)
    return None


@dataclass(frozen=True)
class AllowedTokens:
    """The whitelist as a logits bias: 0 for allowed tokens, NEG_INF elsewhere."""

    bias: torch.Tensor  # [vocab] float32
    comma: int

    @classmethod
    def from_words(cls, tokenizer: ExpansionTokenizer, words: Sequence[str], vocab: int) -> AllowedTokens:
        bias = torch.full((vocab,), NEG_INF, dtype=torch.float32)
        ids = [t for t in (tokenizer.word_token(w) for w in words) if t is not None and t < vocab]
        comma = tokenizer.comma()
        bias[torch.tensor(ids + [comma], dtype=torch.long)] = 0.0
        return cls(bias, comma)

    @property
    def count(self) -> int:
        return int((self.bias == 0).sum())


Models = Callable[[str, dict], dict]


class PromptExpander:
    """`expander(prompt, seed) -> text`: Fooocus V2 over the `prompt_expansion` leaf."""

    def __init__(self, models: Models, tokenizer: ExpansionTokenizer, vocab: int, words: Sequence[str] | None = None,
                 max_positions: int = 1024, top_k: int = TOP_K):
        self.models = models
        self.tokenizer = tokenizer
        self.allowed = AllowedTokens.from_words(tokenizer, read_words() if words is None else words, vocab)
        self.max_positions = max_positions
        self.top_k = top_k

    def __call__(self, prompt: str, seed: int) -> str:
        if prompt == "":
            return ""
        prompt = safe_str(prompt) + ","
        ids = self.tokenizer.ids(prompt)
        n = len(ids)
        new_tokens = BUDGET * math.ceil(n / BUDGET) - n
        if new_tokens == 0 or n + new_tokens > self.max_positions:
            return prompt[:-1]  # nothing to add (or a prompt beyond the model's context)
        generator = torch.Generator().manual_seed(int(seed) % SEED_MODULUS)
        sequence = torch.tensor([ids], dtype=torch.int64)
        for _ in range(new_tokens):
            logits = self.models(PROMPT_EXPANSION, {"input_ids": sequence})["logits"][0, -1].float()
            token = self.sample(logits, sequence[0], generator)
            sequence = torch.cat([sequence, torch.tensor([[token]], dtype=torch.int64)], dim=1)
        return safe_str(self.tokenizer.decode(sequence[0].tolist()))

    def scores(self, logits: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        """Fooocus's logits processor: the whitelist bias, every token already in the sequence
        banned, the comma always allowed."""
        bias = self.allowed.bias.clone()
        bias[sequence.long()] = NEG_INF
        bias[self.allowed.comma] = 0.0
        return logits + bias

    def sample(self, logits: torch.Tensor, sequence: torch.Tensor, generator: torch.Generator) -> int:
        """Top-k (100) sampling at temperature 1 from the processed scores."""
        scores = self.scores(logits, sequence)
        top, index = torch.topk(scores, min(self.top_k, scores.numel()))
        probs = torch.softmax(top, dim=-1)
        return int(index[torch.multinomial(probs, 1, generator=generator)])


