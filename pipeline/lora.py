"""Weight patches: LoRAs, Fooocus's inpaint patch and its inpaint head, as new values of leaf
model parameters. The one place that reads patch files and computes merged weights; the ONNX
Runtime sessions (`pipeline.models.PatchedSessions`), the python-torch leaf (`TorchPatcher`) and,
later, the TensorRT refitter all apply what `leaf_updates` returns.

A patch set is a hashable, canonical `tuple[Patch, ...]`; it travels with every leaf call (a
Triton request parameter, `PATCHES_PARAMETER`, in the served pipeline). Each leaf takes its part:

  kind            file                                   reaches            new value
  lora            kohya (`lora_unet_*`, `lora_te1_*`,    text_encoder_l     W + w * (alpha / rank) * up @ down
                  `lora_te2_*`) or diffusers/peft        text_encoder_g     (alpha defaults to rank; conv
                  (`unet.*`, `text_encoder(_2).*`)       unet               down kxk with up 1x1 included)
                  .safetensors
  fooocus_patch   Fooocus `*.fooocus.patch`: ldm UNet    unet               W + w * (q / 255 * (max - min) + min)
                  keys -> (uint8 q, min, max)
  inpaint_head    `fooocus_inpaint_head.pth`:            unet               w * head (replaces INPAINT_HEAD_PARAM)
                  {"head": [320, 5, 3, 3]}

Leaf parameter names are those of the torch leaf modules (`pipeline.torch_leaves`), e.g.
`model.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.weight` in the UNet leaf or
`model.text_model.encoder.layers.0.self_attn.q_proj.weight` in a text encoder; the exporter keeps
every parameter an ONNX initializer under that name (`export.onnx_export`), so the same names
address ONNX initializers and TensorRT refit weights.

Key mapping uses diffusers' own converters: `StableDiffusionXLLoraLoaderMixin.lora_state_dict`
(kohya -> diffusers, incl. the sgm `input_blocks` naming of SDXL kohya files), diffusers'
state-dict tables (-> peft `lora_A`/`lora_B`), and `convert_ldm_unet_checkpoint` (ldm UNet keys of
the Fooocus patch -> diffusers). The UNet config those need (`layers_per_block`, the addition
embedding) is read off the parameter names, so no config file has to travel with an ONNX file.

Files are read without unpickling code: safetensors, or `torch.load(weights_only=True)` for the
Fooocus `.patch`/`.pth` files (plain dicts of tensors and tuples, which that loader accepts).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .errors import UnsupportedFeature
from .interfaces import INPAINT_HEAD_PARAM, TEXT_ENCODER_G, TEXT_ENCODER_L, UNET

log = logging.getLogger(__name__)

LORA = "lora"
FOOOCUS_PATCH = "fooocus_patch"
INPAINT_HEAD = "inpaint_head"
KINDS = (LORA, FOOOCUS_PATCH, INPAINT_HEAD)

# The leaves a patch set reaches, and the LoRA component each one takes.
PATCHABLE_LEAVES = {TEXT_ENCODER_L: "text_encoder", TEXT_ENCODER_G: "text_encoder_2", UNET: "unet"}
UNET_ONLY_KINDS = (FOOOCUS_PATCH, INPAINT_HEAD)

# Where LoRA files live when nothing else is configured: the frontend's `--loras-dir` default.
DEFAULT_LORAS_DIR = Path(__file__).resolve().parent.parent / "models" / "loras"
LORAS_DIR_ENV = "FOOOCUS_LORAS_DIR"
CACHE_SIZE_ENV = "FOOOCUS_PATCHED_SESSIONS"  # patched sessions (weight sets) kept per leaf besides the base
DEFAULT_CACHE_SIZE = 2
# Extensions Fooocus lists in the LoRA folder; .safetensors is read with safetensors, the others
# with torch.load(weights_only=True).
LORA_EXTENSIONS = (".safetensors", ".ckpt", ".bin", ".pth", ".pt")


@dataclass(frozen=True, order=True)
class Patch:
    kind: str  # one of KINDS
    path: str  # an absolute file path
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown weight patch kind {self.kind!r}; expected one of {KINDS}")


PatchSet = tuple  # tuple[Patch, ...], canonical (see `canonical`)


def canonical(patches: Iterable[Patch]) -> PatchSet:
    """Sorted, weight-0 entries dropped (W + 0 * dW = W, and a zero inpaint head is the base's):
    the same weights always get the same key."""
    return tuple(sorted(p for p in patches if float(p.weight) != 0.0))


def for_leaf(leaf: str, patches: Iterable[Patch]) -> PatchSet:
    """The part of a patch set that can change `leaf`'s weights (empty for the VAE, expansion, ...)."""
    if leaf not in PATCHABLE_LEAVES:
        return ()
    return canonical(p for p in patches if leaf == UNET or p.kind not in UNET_ONLY_KINDS)


def to_json(patches: Iterable[Patch]) -> str:
    return json.dumps([[p.kind, p.path, p.weight] for p in patches])


def from_json(text: str | bytes | None) -> PatchSet:
    if not text:
        return ()
    return canonical(Patch(str(kind), str(path), float(weight)) for kind, path, weight in json.loads(text))


def cache_key(patches: PatchSet) -> tuple:
    """What a cached merge depends on: the patches and their files' identity (size, mtime), so a
    replaced file is merged again."""
    key = []
    for p in patches:
        try:
            st = os.stat(p.path)
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        key.append((p.kind, p.path, float(p.weight), stamp))
    return tuple(key)


# --- which LoRAs a task uses ----------------------------------------------------------------------


class MissingModelFile(UnsupportedFeature):
    """A model file the request needs is not where the server looks for it."""


def resolve_loras_dir(configured: str | Path | None = None) -> Path:
    """The LoRA folder: the `FOOOCUS_LORAS_DIR` environment variable (set by the frontend for the
    Triton it launches, and by the tests), else the pipeline's `loras_dir` parameter, else
    `models/loras` under the project root."""
    env = os.environ.get(LORAS_DIR_ENV)
    return Path(env or configured or DEFAULT_LORAS_DIR)


def lora_filenames(folder: Path) -> list[str]:
    """File names relative to the folder ('sub/name.safetensors'), as /v1/engines/all-models lists them."""
    if not folder.is_dir():
        return []
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.is_file() and p.name.lower().endswith(LORA_EXTENSIONS)]
    return sorted(names, key=str.casefold)


@dataclass(frozen=True)
class TaskLoras:
    applied: tuple  # ((name, weight), ...) in Fooocus's order: user LoRAs, prompt tags, performance LoRA
    patches: PatchSet


def task_loras(user: Iterable[tuple[str, float]], prompt: str, performance, folder: Path) -> TaskLoras:
    """Fooocus's LoRA list for a task. `user`: the request's enabled (name, weight) pairs, already
    cut to 5; a name that is not a file in `folder` becomes "None" (Fooocus-API) and is skipped.
    `<lora:name:w>` tags of the main prompt line are merged in (matched by file stem, not against
    the performance LoRA), the list is cut to 5, then the performance mode's LoRA is appended; a
    missing performance LoRA raises MissingModelFile naming the file and the folder."""
    from .prompts import extract_lora_tags, merge_prompt_loras, prompt_lines

    files = lora_filenames(folder)
    known = set(files)
    loras = [(name, float(w)) if name in known else ("None", float(w)) for name, w in user]
    perf = performance.lora
    tags, _ = extract_lora_tags(prompt_lines(prompt)[0])
    candidates = [f for f in files if perf is None or f != perf[0]]
    loras = [x for x in merge_prompt_loras(loras, tags, candidates) if x[0] != "None"]
    if perf is not None:
        if perf[0] not in known:
            raise MissingModelFile(f"performance '{performance.name}' needs the LoRA {perf[0]}, which is not in "
                                   f"the LoRA folder {folder}; put the file there (Fooocus downloads it from "
                                   f"its model list)")
        loras.append((perf[0], float(perf[1])))
    patches = canonical(Patch(LORA, str(folder / name), w) for name, w in loras)
    return TaskLoras(tuple(loras), patches)


# --- reading patch files --------------------------------------------------------------------------


def load_tensors(path: str | Path, keep=None) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) without executing pickled code; from a .safetensors
    file only the keys `keep(key)` accepts are read."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return ({k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)},
                    dict(f.metadata() or {}))
    return torch.load(str(path), map_location="cpu", weights_only=True), {}


# kohya prefix -> component; diffusers/peft prefix -> component
_KOHYA = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te_": "text_encoder", "lora_te2_": "text_encoder_2"}
_DIFFUSERS = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# The down/up (or A/B) suffixes of the LoRA formats diffusers reads.
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight",
                  "_lora.down.weight")


def _up_key(down_key: str) -> str:
    for down, up in ((".lora_down.", ".lora_up."), (".lora_A.", ".lora_B."), (".lora.down.", ".lora.up."),
                     (".lora_linear_layer.down.", ".lora_linear_layer.up."), ("_lora.down.", "_lora.up.")):
        if down in down_key:
            return down_key.replace(down, up)
    raise KeyError(down_key)


def _module_of(down_key: str) -> str:
    for suffix in _DOWN_SUFFIXES:
        if down_key.endswith(suffix):
            return down_key[: -len(suffix)]
    raise KeyError(down_key)


@dataclass
class LoraModules:
    """One component's LoRA pairs: {module path: (down, up)} with alpha/rank folded into up."""

    pairs: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)  # keys that are no down/up pair (DoRA, LoHa, bias ...)


def _component_of(key: str) -> str | None:
    for prefixes in (_KOHYA, _DIFFUSERS):
        for prefix, component in prefixes.items():
            if key.startswith(prefix):  # (no prefix is a prefix of another: "lora_te_" vs "lora_te1_")
                return component
    return None


def _is_kohya(state: dict) -> bool:
    return any(k.startswith(tuple(_KOHYA)) for k in state)


def unclaimed_keys(state: dict) -> list[str]:
    """Keys of a LoRA file that belong to no component (a diffusers file without prefixes is a
    UNet file)."""
    if not _is_kohya(state) and not any(_component_of(k) for k in state):
        return []
    return [k for k in state if _component_of(k) is None]


def lora_modules(state: dict, metadata: dict, component: str, unet_config=None) -> LoraModules:
    """The LoRA pairs of one component ("unet", "text_encoder", "text_encoder_2") in diffusers
    module paths (relative to the component: `down_blocks.0...`, `text_model.encoder...`)."""
    from diffusers.utils.state_dict_utils import (DIFFUSERS_OLD_TO_PEFT, DIFFUSERS_TO_PEFT, UNET_TO_DIFFUSERS,
                                                  convert_state_dict)

    kohya = _is_kohya(state)
    unprefixed_unet = not kohya and not any(_component_of(k) for k in state)  # old unet-only diffusers files
    own = {k: v for k, v in state.items()
           if _component_of(k) == component or (unprefixed_unet and component == "unet")}
    out = LoraModules()
    pairs = {}
    alphas = {}
    for key, value in own.items():
        if key.endswith(".alpha"):
            alphas[key[: -len(".alpha")]] = float(value)
        elif any(key.endswith(s) for s in _DOWN_SUFFIXES):
            up = own.get(_up_key(key))
            if up is None:
                out.ignored.append(key)
            else:
                pairs[key] = (value, up)
        elif not any(key.endswith(s.replace("down", "up").replace("lora_A", "lora_B")) for s in _DOWN_SUFFIXES):
            out.ignored.append(key)
    if not pairs:
        return out
    meta_alpha = _metadata_alphas(metadata, component)
    scaled = {}
    for key, (down, up) in pairs.items():
        module = _module_of(key)
        rank = down.shape[0]
        alpha = alphas.get(module, alphas.get(module.replace(".processor", ""), meta_alpha(module, rank)))
        up = up.float() * (alpha / rank) if alpha is not None else up.float()
        scaled[key] = down.float()
        scaled[_up_key(key)] = up
    prefix = component + "."
    if kohya:  # kohya -> diffusers names, "unet."/"text_encoder."/"text_encoder_2." prefixed
        from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin

        try:
            converted, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
                scaled, unet_config=unet_config if component == "unet" else None)
        except ValueError as exc:  # a key diffusers cannot place: the whole component is unusable
            log.warning("LoRA %s keys could not be converted (%s); skipped", component, exc)
            out.ignored.extend(scaled)
            return out
        scaled = {k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)}
    else:
        scaled = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in scaled.items()}
    if component == "unet":
        mapping = {**UNET_TO_DIFFUSERS, ".lora_linear_layer.up": ".lora_B", ".lora_linear_layer.down": ".lora_A"}
    else:
        mapping = {**DIFFUSERS_OLD_TO_PEFT, **DIFFUSERS_TO_PEFT, ".lora.up": ".lora_B", ".lora.down": ".lora_A"}
    peft = convert_state_dict(scaled, mapping)
    for key, down in peft.items():
        if ".lora_A." not in key:
            continue
        up = peft.get(key.replace(".lora_A.", ".lora_B."))
        if up is None:
            out.ignored.append(key)
            continue
        out.pairs[key.split(".lora_A.")[0]] = (down, up)
    return out


def _metadata_alphas(metadata: dict, component: str):
    """alpha from diffusers' `lora_adapter_metadata` (peft's lora_alpha / alpha_pattern), else None
    (alpha = rank)."""
    raw = metadata.get("lora_adapter_metadata")
    config = {}
    if raw:
        try:
            data = json.loads(raw)
            config = {k[len(component) + 1:]: v for k, v in data.items() if k.startswith(component + ".")}
        except (ValueError, AttributeError):
            config = {}
    default = config.get("lora_alpha")
    pattern = config.get("alpha_pattern") or {}

    def alpha(module: str, rank: int):
        for name, value in pattern.items():
            if module == name or module.endswith("." + name):
                return float(value)
        return float(default) if default is not None else None

    return alpha


def unet_config_from_names(names: Iterable[str], prefix: str = "model.") -> dict:
    """The UNet config fields diffusers' key converters read, from the UNet leaf's parameter
    names: layers_per_block (resnets in the first down block) and the addition embedding."""
    from diffusers.configuration_utils import FrozenDict

    names = list(names)
    pattern = re.compile(rf"{re.escape(prefix)}down_blocks\.0\.resnets\.(\d+)\.")
    resnets = {int(m.group(1)) for m in map(pattern.match, names) if m}
    return FrozenDict(
        layers_per_block=(max(resnets) + 1) if resnets else 2,
        addition_embed_type="text_time" if f"{prefix}add_embedding.linear_1.weight" in names else None,
        class_embed_type=None, num_class_embeds=None)


def ldm_unet_names(ldm_keys: Iterable[str], unet_config) -> dict[str, str]:
    """{ldm UNet key: diffusers UNet key} by diffusers' single-file converter, run on the keys
    themselves (the converter only renames). Block ids the keys skip and the SDXL label-embedding
    keys it indexes directly are filled with placeholders, which are dropped again."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    keys = list(ldm_keys)
    probe = {LDM_UNET_KEY + k: k for k in keys}
    for k in keys:  # the converter moves some weight/bias pairs together
        stem = k.rsplit(".", 1)[0]
        for suffix in ("weight", "bias"):
            probe.setdefault(f"{LDM_UNET_KEY}{stem}.{suffix}", None)
    for block in ("input_blocks", "middle_block", "output_blocks"):
        pattern = re.compile(rf"{block}\.(\d+)\.")
        ids = {int(m.group(1)) for m in map(pattern.match, keys) if m}
        for i in range(max(ids) + 1 if ids else 0):
            if i not in ids:
                probe[f"{LDM_UNET_KEY}{block}.{i}.0.__placeholder__"] = None
    for k in ("label_emb.0.0.weight", "label_emb.0.0.bias", "label_emb.0.2.weight", "label_emb.0.2.bias"):
        probe.setdefault(LDM_UNET_KEY + k, None)
    converted = convert_ldm_unet_checkpoint(probe, dict(unet_config))
    return {ldm: diffusers for diffusers, ldm in converted.items() if ldm is not None}


# --- merging --------------------------------------------------------------------------------------


class WeightSource(Protocol):
    """A leaf's current (base) parameters by leaf parameter name."""

    def names(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple | None: ...

    def value(self, name: str) -> torch.Tensor: ...  # float32


@dataclass
class PatchReport:
    """What merging a patch set into one leaf did (for logs and tests)."""

    changed: int = 0  # parameters with a new value
    unmatched: dict = field(default_factory=dict)  # patch path -> keys that matched no parameter


def leaf_updates(leaf: str, patches: PatchSet, weights: WeightSource) -> tuple[dict, PatchReport]:
    """{parameter name: new float32 value} for the parameters `patches` change in `leaf`, given
    its base weights (deltas summed over the patches, then added once to the base)."""
    report = PatchReport()
    patches = for_leaf(leaf, patches)
    if not patches:
        return {}, report
    names = set(weights.names())
    deltas: dict[str, torch.Tensor] = {}
    replaced: dict[str, torch.Tensor] = {}
    unet_config = unet_config_from_names(names) if leaf == UNET else None

    def add(name: str, delta: torch.Tensor):
        deltas[name] = deltas[name] + delta if name in deltas else delta

    for patch in patches:
        unmatched: list[str] = []
        if patch.kind == LORA:
            component = PATCHABLE_LEAVES[leaf]
            state, metadata = load_tensors(patch.path, lambda k: _component_of(k) in (component, None))
            modules = lora_modules(state, metadata, component, unet_config)
            unmatched += modules.ignored
            if leaf == UNET:  # keys no component claims are reported once, by the UNet
                unmatched += unclaimed_keys(state)
            for module, (down, up) in modules.pairs.items():
                name = next((n for n in _param_candidates(module) if n in names), None)
                shape = weights.shape(name) if name else None
                rank = down.shape[0]
                if shape is None or up.shape[0] * down[0].numel() != _numel(shape) or up.numel() != up.shape[0] * rank:
                    unmatched.append(module)
                    continue
                add(name, patch.weight * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(shape))
        elif patch.kind == FOOOCUS_PATCH:
            state, _ = load_tensors(patch.path)
            ldm = {_strip_ldm(k): v for k, v in state.items()}
            mapping = ldm_unet_names(ldm, unet_config)
            for key, value in ldm.items():
                name = f"model.{mapping[key]}" if key in mapping else None
                shape = weights.shape(name) if name in names else None
                if shape is None or not isinstance(value, (tuple, list)) or len(value) != 3 \
                        or tuple(value[0].shape) != tuple(shape):
                    unmatched.append(key)
                    continue
                q, lo, hi = (torch.as_tensor(v).float() for v in value)
                add(name, patch.weight * (q / 255.0 * (hi - lo) + lo))
        elif patch.kind == INPAINT_HEAD:
            state, _ = load_tensors(patch.path)
            head = state.get("head") if isinstance(state, dict) else None
            shape = weights.shape(INPAINT_HEAD_PARAM)
            if head is None or shape is None or tuple(head.shape) != tuple(shape):
                raise ValueError(f"{patch.path}: not an inpaint head for this UNet (expected 'head' of shape "
                                 f"{shape}, got {None if head is None else tuple(head.shape)})")
            replaced[INPAINT_HEAD_PARAM] = patch.weight * head.float()
        if unmatched:
            report.unmatched[patch.path] = unmatched
            log.warning("%s: %d %s key(s) match no %s weight and were skipped (e.g. %s)", patch.path, len(unmatched),
                        patch.kind, leaf, ", ".join(unmatched[:3]))
    updates = dict(replaced)
    for name, delta in deltas.items():
        base = updates[name] if name in updates else weights.value(name)
        updates[name] = base.float() + delta.to(base.device)
    report.changed = len(updates)
    log.info("%s: %d weight(s) patched by %s", leaf, len(updates),
             ", ".join(f"{Path(p.path).name}@{p.weight:g}" for p in patches))
    return updates, report


def _param_candidates(module: str) -> tuple[str, ...]:
    """Leaf parameter names a LoRA module path may stand for. LoRA files name CLIP modules
    `text_model.encoder...`; transformers 5's CLIPTextModel has no `text_model` level."""
    names = [f"model.{module}.weight", f"model.text_model.{module}.weight"]
    if module.startswith("text_model."):
        names.append(f"model.{module[len('text_model.'):]}.weight")
    return tuple(names)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _strip_ldm(key: str) -> str:
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# --- per-process caches of merged weight sets -----------------------------------------------------


def cache_size_from(value: str | int | None = None) -> int:
    """The number of patched weight sets a leaf keeps besides its base: an explicit value (config
    parameter), else `FOOOCUS_PATCHED_SESSIONS`, else 2."""
    raw = value if value not in (None, "") else os.environ.get(CACHE_SIZE_ENV, DEFAULT_CACHE_SIZE)
    return max(0, int(raw))


class MergedCache:
    """An LRU of built weight sets by `cache_key`, with counters. `get(patches, build)` returns the
    cached entry or builds one (on a miss). Thread-safe; builds of different keys may overlap."""

    def __init__(self, size: int):
        self.size = size
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, patches: PatchSet, build):
        key = cache_key(patches)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key], "hit"
            self.misses += 1
        entry = build()
        with self._lock:
            if self.size > 0:
                self._entries[key] = entry
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
                    self.evictions += 1
        return entry, "miss"

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "cached": len(self._entries)}


class TorchWeights:
    """WeightSource over a torch module's parameters, reading the base values kept by TorchPatcher
    for parameters it has changed."""

    def __init__(self, params: dict, base: dict):
        self.params, self.base = params, base

    def names(self):
        return self.params.keys()

    def shape(self, name):
        p = self.params.get(name)
        return tuple(p.shape) if p is not None else None

    def value(self, name):
        return (self.base[name] if name in self.base else self.params[name].detach()).float()


class TorchPatcher:
    """Patch sets on a torch leaf module (the python-torch target): `apply(patches)` puts the
    merged weights in place (restoring the base weights of whatever the previous set changed);
    merged sets are cached like the ONNX sessions (LRU, `cache_size`), the base values of changed
    parameters are kept once. Parameters are updated in place, so compiled graphs stay valid."""

    def __init__(self, module: torch.nn.Module, leaf: str, cache_size: int | None = None):
        self.leaf = leaf
        self.params = dict(module.named_parameters())
        self.base: dict[str, torch.Tensor] = {}
        self.cache = MergedCache(cache_size_from(cache_size))
        self._current: tuple = ()
        self._changed: tuple = ()

    @torch.no_grad()
    def apply(self, patches: PatchSet) -> str:
        patches = for_leaf(self.leaf, patches)
        key = cache_key(patches)
        if key == self._current:
            return "current"
        for name in self._changed:
            self.params[name].copy_(self.base[name])
        self._current, self._changed = (), ()
        if not patches:
            return "base"

        def build():
            updates, _ = leaf_updates(self.leaf, patches, TorchWeights(self.params, self.base))
            return {n: v.to(self.params[n].device, self.params[n].dtype) for n, v in updates.items()}

        updates, result = self.cache.get(patches, build)
        for name, value in updates.items():
            if name not in self.base:
                self.base[name] = self.params[name].detach().clone()
            self.params[name].copy_(value)
        self._current, self._changed = key, tuple(updates)
        return result
