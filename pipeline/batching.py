"""Batching across jobs: how leaf calls are merged and split around Triton's dynamic batcher.

Every leaf tensor has "batch" as its first axis (`pipeline.interfaces`), and every leaf config has
`max_batch_size` = `interfaces.LEAF_MAX_BATCH` with a `dynamic_batching` block, so Triton may hand
one `execute` the requests of several concurrent jobs (e.g. the UNet calls of four jobs at the same
step). Two halves live here, plain numpy/torch, testable without Triton:

Leaf side (the python leaves: python_ort_leaf, python_torch_leaf, python_trt_leaf). The batcher
does not look at request parameters, so one `execute` may mix weight-patch sets; it does keep
non-batch shapes equal (Triton batches only requests whose inputs agree past axis 0), but the
grouping checks them anyway. `run_grouped` groups the requests that can run as one call (same key,
e.g. the patch set or the session it selects, and same non-batch shapes and dtypes: `group_requests`,
`shape_key`), concatenates their inputs on axis 0 (`concat`), runs each group once and splits the
outputs back per request (`split`). A request that failed before (a broken patch set) stays an
exception and is never part of a group; a group whose run fails fails its own requests only.

Pipeline side (the BLS model). A core call may be larger than a leaf takes (text encoders with
many prompt chunks, an image batch through the VAE): `BatchLimitedRunner` cuts it into calls of
at most the leaf's max batch and concatenates the outputs. It also carries tensors whose only axis
is the batch (the UNet's `timestep`) as [B, 1]: a Triton config with `max_batch_size > 0` must give
every tensor at least one non-batch dim, so those are written `dims: [ 1 ]` with `reshape: { shape:
[ ] }` (the model itself still sees [B]) and requests must send [B, 1].
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

Arrays = Mapping[str, Any]  # {tensor name: numpy array or torch tensor}, axis 0 = batch


# --- leaf side -------------------------------------------------------------------------------------

def batch_size(feeds: Arrays) -> int:
    """The batch (axis 0) of a request's inputs; Triton has checked that they all agree."""
    return int(next(iter(feeds.values())).shape[0])


def shape_key(feeds: Arrays) -> tuple:
    """What must be equal for two requests' inputs to be concatenated: names, non-batch shapes, dtypes."""
    return tuple((name, tuple(value.shape[1:]), str(value.dtype)) for name, value in feeds.items())


def group_requests(items: Sequence, key: Callable[[Any], Hashable]) -> list[list[int]]:
    """Indices of `items` grouped by `key(item)`: groups in order of their first item, items in order."""
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())


def concat(feeds: Sequence[Arrays]) -> tuple[dict, list[int]]:
    """One batch from several requests' inputs (same names, shapes past axis 0): ({name: concatenated
    on axis 0}, each request's batch size). A single request is passed through without a copy."""
    sizes = [batch_size(f) for f in feeds]
    if len(feeds) == 1:
        return dict(feeds[0]), sizes
    out = {}
    for name, first in feeds[0].items():
        parts = [f[name] for f in feeds]
        out[name] = torch.cat(parts, 0) if isinstance(first, torch.Tensor) else np.concatenate(parts, 0)
    return out, sizes


def split(outputs: Arrays, sizes: Sequence[int]) -> list[dict]:
    """The outputs of a concatenated call cut back into one {name: array} per request (views, no copy)."""
    for name, value in outputs.items():
        if value.shape[0] != sum(sizes):
            raise ValueError(f"output {name!r} has batch {value.shape[0]}, the requests sent {sum(sizes)}")
    out, start = [], 0
    for size in sizes:
        out.append({name: value[start:start + size] for name, value in outputs.items()})
        start += size
    return out


class PatchSetError(Exception):
    """A request's weight-patch set could not be read or applied: that request fails alone."""

    @classmethod
    def wrapping(cls, exc: BaseException) -> "PatchSetError":
        return cls(f"weight patches: {type(exc).__name__}: {exc}")


def error_message(exc: BaseException) -> str:
    """The error text a leaf sends back for a failed request (or group)."""
    return str(exc) if isinstance(exc, PatchSetError) else f"{type(exc).__name__}: {exc}"


def run_grouped(items: Sequence[tuple[Hashable, Arrays] | BaseException],
                run: Callable[[Hashable, dict], Arrays]) -> list[dict | BaseException]:
    """A python leaf's `execute` over its requests: `items[i]` is (key, inputs) for request i, or the
    exception that already failed it. Requests with equal key and `shape_key` run as one call,
    `run(key, concatenated inputs) -> outputs`; returns per request its outputs or its exception
    (the one it came with, or the one its group's run raised)."""
    results: list[dict | BaseException | None] = [item if isinstance(item, BaseException) else None
                                                   for item in items]
    live = [i for i, item in enumerate(items) if not isinstance(item, BaseException)]
    for group in group_requests(live, lambda i: (items[i][0], shape_key(items[i][1]))):
        indices = [live[g] for g in group]
        feeds, sizes = concat([items[i][1] for i in indices])
        try:
            parts = split(run(items[indices[0]][0], feeds), sizes)
        except Exception as exc:  # noqa: BLE001 - the group's requests fail, the other groups still run
            parts = [exc] * len(indices)
        for i, part in zip(indices, parts):
            results[i] = part
    return results


# --- pipeline side ---------------------------------------------------------------------------------

class BatchLimitedRunner:
    """A `pipeline.models.ModelRunner` over another (the BLS one) for leaves served with
    `max_batch_size > 0`: a call larger than `max_batch[model]` becomes several calls of at most
    that many samples, outputs concatenated in order; tensors in `batch_only[model]` (shape [B])
    travel as [B, 1] and come back as [B]. Models not in `max_batch` are called unchanged."""

    def __init__(self, runner, max_batch: Mapping[str, int], batch_only: Mapping[str, frozenset] | None = None):
        self.runner = runner
        self.max_batch = dict(max_batch)
        self.batch_only = {k: frozenset(v) for k, v in (batch_only or {}).items()}

    @classmethod
    def for_specs(cls, runner, specs: Mapping[str, Any]) -> BatchLimitedRunner:
        """Limits from `interfaces.leaf_max_batch` of each spec's role (`spec.name`: a refiner leaf
        maps to the UNet's spec, so it gets the UNet's limit)."""
        from .interfaces import leaf_max_batch

        return cls(runner, {leaf: leaf_max_batch(spec.name) for leaf, spec in specs.items()},
                   {leaf: frozenset(t.name for t in (*spec.inputs, *spec.outputs) if len(t.shape) == 1)
                    for leaf, spec in specs.items()})

    def __call__(self, model: str, inputs: dict[str, torch.Tensor], patches: tuple = ()) -> dict[str, torch.Tensor]:
        limit = self.max_batch.get(model)
        n = batch_size(inputs)
        if limit is None or n <= limit:
            return self._call(model, inputs, patches)
        parts = [self._call(model, {k: v[start:start + limit] for k, v in inputs.items()}, patches)
                 for start in range(0, n, limit)]
        return {name: torch.cat([p[name] for p in parts], 0) for name in parts[0]}

    def _call(self, model, inputs, patches):
        column = self.batch_only.get(model, frozenset())
        if column:
            inputs = {k: v.reshape(-1, 1) if k in column and v.dim() == 1 else v for k, v in inputs.items()}
        out = self.runner(model, inputs, patches=patches) if patches else self.runner(model, inputs)
        if column:
            out = {k: v.reshape(-1) if k in column and v.dim() == 2 and v.shape[1] == 1 else v
                   for k, v in out.items()}
        return out


def leaf_responses(pb_utils, items: Sequence, run: Callable, output_names: Sequence[str],
                   tensor: Callable) -> list:
    """A python leaf's `execute` result: `run_grouped(items, run)`, each output dict turned into an
    InferenceResponse of `tensor(name, value)` outputs in `output_names` order, each failure into an
    error response (`error_message`). `pb_utils` is the backend's module (Triton's, or a stand-in)."""
    return [pb_utils.InferenceResponse(error=pb_utils.TritonError(error_message(out)))
            if isinstance(out, BaseException) else
            pb_utils.InferenceResponse([tensor(n, out[n]) for n in output_names])
            for out in run_grouped(items, run)]
