"""TensorRT engines of the `tensorrt` target's patchable leaves (text encoders, UNet, refiner UNets),
run from a python-backend leaf (`model_repository/python_trt_leaf`) so that weight patches (LoRAs,
the inpaint patch and head) can be applied by refitting: Triton's own TensorRT backend cannot.

  refit_weights(leaf, patches, model.onnx)   {initializer name: merged float32 value}: the same
                                             `pipeline.lora.leaf_updates` the python-ort leaf binds
                                             to ONNX Runtime (pure; runs on the CPU)
  load_refit_weights(refitter, updates, ...) hands them to a `trt.Refitter`, with every weight the
                                             engine fused with a changed one, and refits
  TrtEngine                                  one deserialized `model.plan` + one execution context,
                                             called with torch CUDA tensors (FP32 at the interface)
  RefittedEngines                            the base engine (never refitted) and an LRU of refitted
                                             copies, one per patch set

Names: the exporter keeps every parameter an ONNX initializer under its torch name and layout
(`export.onnx_export.optimize_keeping_parameters`) and TensorRT's ONNX parser names each weight
after its initializer, so a refit weight is addressed by the name `leaf_updates` returns. A
`trt.Weights` carries a count and a type, no shape: the values are given in the initializer's
layout, and TensorRT replays its own build-time folds (e.g. a Linear weight's Transpose) when it
refits. A name the plan does not list as refittable (a plan built without REFIT, or a weight
TensorRT folded into an anonymous one) fails the patch set with an error naming it.

This module imports on any machine; TensorRT and CUDA are imported only where an engine is loaded,
and their absence raises `TensorRTUnavailable`.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .errors import TensorRTUnavailable
from .interfaces import TEXT_ENCODER_G, TEXT_ENCODER_L, UNET

log = logging.getLogger(__name__)

# The leaves the tensorrt target serves from refittable plans through python_trt_leaf (their role:
# which weights a patch set changes). A refiner's UNet leaf is `unet__<checkpoint>` with role `unet`.
REFITTED_ROLES = (TEXT_ENCODER_L, TEXT_ENCODER_G, UNET)


def refit_role(leaf_name: str) -> str | None:
    """The role of a leaf the tensorrt target refits (text encoders, UNet, refiner UNets), else None
    (VAE, upscaler, expansion: Triton's native TensorRT backend)."""
    if leaf_name in REFITTED_ROLES:
        return leaf_name
    if leaf_name.startswith(UNET + "__"):  # export.repository.refiner_leaf_name
        return UNET
    return None


class RefitError(RuntimeError):
    """A patch set could not be loaded into an engine (the request fails, the model stays)."""


def load_tensorrt():
    """The `tensorrt` module, where it and a CUDA GPU are present; else TensorRTUnavailable."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed here: the tensorrt target's engines (model.plan) run only inside the "
            "Triton container on the GPU they were built on (docs/production.md); serve a python-ort or "
            "python-torch repository elsewhere") from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT is installed but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES?): "
                                  "TensorRT engines run on the GPU they were built on")
    return trt


# --- the weights a refit loads (pure) -------------------------------------------------------------


def _onnx_weights(source):
    from .models import OnnxWeights

    return source if isinstance(source, OnnxWeights) else OnnxWeights(source)


def refit_weights(leaf: str, patches: tuple, onnx_path) -> dict[str, np.ndarray]:
    """{initializer name of `onnx_path`: merged float32 value in the initializer's shape} for the
    parameters `patches` change in `leaf` (empty when they change nothing there): exactly what
    `pipeline.models.PatchedSessions` binds to ONNX Runtime for the same patch set. `onnx_path` may
    be an already loaded `OnnxWeights`."""
    from .lora import leaf_updates

    weights = _onnx_weights(onnx_path)
    updates, _ = leaf_updates(leaf, patches, weights)
    out = {}
    for name, value in updates.items():
        shape = weights.shape(name)
        if shape is None:
            raise RefitError(f"{name!r} is no initializer of {weights.path}")
        array = np.ascontiguousarray(value.detach().cpu().numpy(), dtype=np.float32)
        if tuple(array.shape) != tuple(shape):
            raise RefitError(f"{name!r}: merged value of shape {array.shape}, initializer {tuple(shape)}")
        out[name] = array
    return out


def onnx_base_values(onnx_path) -> Callable[[str], np.ndarray]:
    """name -> the exported (unpatched) value of an initializer (KeyError for other names): what a
    refit supplies for the weights TensorRT fused with a changed one (`onnx_path`: or an `OnnxWeights`)."""
    weights = _onnx_weights(onnx_path)

    def value(name: str) -> np.ndarray:
        if weights.shape(name) is None:
            raise KeyError(name)
        return weights.value(name).numpy()

    return value


def load_refit_weights(refitter, updates: dict[str, np.ndarray], base_value: Callable[[str], np.ndarray],
                       make_weights: Callable, nptype: Callable) -> dict[str, np.ndarray]:
    """Set `updates` on a `trt.Refitter` (by name), supply every weight the refitter then reports
    missing (weights the engine fused with a changed one, e.g. q/k/v in one GEMM) with its
    `base_value`, and refit. `make_weights` = `trt.Weights`, `nptype` = `trt.nptype` (parameters so
    that the logic runs against a stand-in refitter on the CPU). Returns the arrays it loaded, which
    TensorRT reads until `refit_cuda_engine` returns."""
    refittable = set(refitter.get_all_weights())
    absent = sorted(n for n in updates if n not in refittable)
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise RefitError(
            f"the TensorRT plan has no refittable weight {absent[0]!r}{more}: build the plan refittable from "
            f"this model.onnx (`python -m export tensorrt`); if it was, TensorRT folded that initializer into "
            f"an unnamed weight")
    loaded: dict[str, np.ndarray] = {}
    prototype = getattr(refitter, "get_weights_prototype", None)

    def put(name: str, value: np.ndarray):
        array = np.asarray(value)
        if prototype is not None:
            proto = prototype(name)
            if int(proto.size) != array.size:
                raise RefitError(f"{name!r}: the plan's weight has {int(proto.size)} values, the new one "
                                 f"{array.size} (shape {array.shape})")
            array = array.astype(nptype(proto.dtype), copy=False)
        array = np.ascontiguousarray(array)
        if not refitter.set_named_weights(name, make_weights(array)):
            raise RefitError(f"TensorRT rejected the weight {name!r} ({array.dtype}, shape {array.shape})")
        loaded[name] = array

    for name, value in updates.items():
        put(name, value)
    while True:
        missing = [n for n in refitter.get_missing_weights() if n not in loaded]
        if not missing:
            break
        for name in missing:
            try:
                value = base_value(name)
            except KeyError:
                raise RefitError(f"TensorRT needs the weight {name!r} with the patched ones, and it is no "
                                 f"initializer of model.onnx") from None
            put(name, value)
    still = list(refitter.get_missing_weights())
    if still:
        raise RefitError(f"TensorRT still misses {len(still)} weight(s) after the refit set, e.g. {still[0]!r}")
    if not refitter.refit_cuda_engine():
        raise RefitError("TensorRT's refit_cuda_engine failed; see the TensorRT log")
    return loaded


# --- engines --------------------------------------------------------------------------------------


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
             trt.int32: torch.int32, trt.int8: torch.int8, trt.bool: torch.bool}
    for name, value in (("bfloat16", torch.bfloat16), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = value
    return table[dtype]


class ScratchMemory:
    """One device buffer for the activations of every engine of a leaf instance: they run one at a
    time (one lock), so the refitted copies add their weights only, not another workspace."""

    def __init__(self, device):
        self.device = device
        self.buffer = None
        self.lock = threading.Lock()

    def bind(self, context, size: int):
        import torch

        if size <= 0:
            return
        if self.buffer is None or self.buffer.numel() < size:
            self.buffer = None  # free the old one first
            self.buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
            context.set_device_memory(self.buffer.data_ptr(), self.buffer.numel())
        else:
            context.device_memory = self.buffer.data_ptr()


class TrtEngine:
    """One deserialized plan and its execution context: `engine({input: tensor}) -> {output: FP32
    tensor}` on `device`. Inputs are cast to the engine's tensor types; shapes must lie in the
    plan's optimisation profile. Calls of the engines sharing `scratch` are serialized."""

    def __init__(self, trt, runtime, plan: bytes, device, scratch: ScratchMemory):
        import torch

        self.trt, self.device, self.scratch = trt, torch.device(device), scratch
        with torch.cuda.device(self.device):
            self.engine = runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise RuntimeError("TensorRT could not deserialize the plan (built by another TensorRT version or "
                                   "for another GPU? rebuild it with `python -m export tensorrt`)")
            strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
            if strategy is not None:
                self.context = self.engine.create_execution_context(strategy.USER_MANAGED)
                self.memory_size = int(getattr(self.engine, "device_memory_size_v2", None)
                                       or self.engine.device_memory_size)
            else:  # the context allocates its own activations
                self.context, self.memory_size = self.engine.create_execution_context(), 0
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, inputs: dict) -> dict:
        import torch

        with self.scratch.lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            context, keep = self.context, []
            for name in self.inputs:
                tensor = inputs[name].to(self.device, self.dtypes[name], non_blocking=True).contiguous()
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
                    raise ValueError(f"input {name!r} of shape {tuple(tensor.shape)} is outside the TensorRT "
                                     f"profile ({tuple(lo)} .. {tuple(hi)})")
                context.set_tensor_address(name, tensor.data_ptr())
                keep.append(tensor)
            outputs = {}
            for name in self.outputs:
                out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
                context.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            self.scratch.bind(context, self.memory_size)
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log")
            outputs = {n: t.float() if t.is_floating_point() else t for n, t in outputs.items()}
            # The inputs and the scratch memory must outlive the kernels; the responses leave by DLPack.
            stream.synchronize()
        return outputs


class RefittedEngines:
    """The engines of one leaf instance: `model.plan` as built (the base, never refitted) and, per
    patch set, a copy of it deserialized again and refitted with `refit_weights`, LRU-cached like the
    python leaves' sessions (`pipeline.lora.MergedCache`: key `cache_key(patches)`, i.e. each file's
    path, weight, size and mtime; `cache_size` copies besides the base, `patched_sessions` /
    FOOOCUS_PATCHED_SESSIONS, default 2). One leaf model = one checkpoint's plan, so the key is
    (checkpoint, patch set). Each cached copy holds all the leaf's weights again on the GPU; the
    activation memory is shared (`ScratchMemory`). `last`: base | hit | miss of the latest lookup."""

    def __init__(self, plan_path: str | Path, onnx_path: str | Path, leaf: str, cache_size=None, device=None):
        from .lora import MergedCache, cache_size_from

        self.trt = trt = load_tensorrt()
        import torch

        self.plan_path, self.onnx_path, self.leaf = Path(plan_path), Path(onnx_path), leaf
        if not self.plan_path.is_file():
            raise FileNotFoundError(f"{self.plan_path}: no TensorRT plan; build the repository's engines on this GPU "
                                    f"with `python -m export tensorrt --repository ...`")
        self.device = torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.scratch = ScratchMemory(self.device)
        self.base = TrtEngine(trt, self.runtime, self.plan_path.read_bytes(), self.device, self.scratch)
        self.cache = MergedCache(cache_size_from(cache_size))
        self.last = "base"

    def engine(self, patches: Iterable = ()) -> TrtEngine:
        """The engine to run for `patches` (the base one when they change nothing in this leaf)."""
        from .lora import for_leaf

        patches = for_leaf(self.leaf, patches)
        if not patches:
            self.last = "base"
            return self.base
        engine, self.last = self.cache.get(patches, lambda: self._build(patches))
        return engine

    def _build(self, patches) -> TrtEngine:
        from .models import OnnxWeights

        weights = OnnxWeights(self.onnx_path)  # the model's initializer index, read once per miss
        updates = refit_weights(self.leaf, patches, weights)
        if not updates:
            return self.base
        engine = TrtEngine(self.trt, self.runtime, self.plan_path.read_bytes(), self.device, self.scratch)
        with self.scratch.lock:  # the refit is serialized with this instance's engine calls
            loaded = load_refit_weights(self.trt.Refitter(engine.engine, self.logger), updates,
                                        onnx_base_values(weights), self.trt.Weights, self.trt.nptype)
        log.info("%s: refitted a copy of %s with %d patched weight(s) (%d loaded)", self.leaf, self.plan_path.name,
                 len(updates), len(loaded))
        return engine

    def __call__(self, inputs: dict, patches: Iterable = ()) -> dict:
        return self.engine(patches)(inputs)

    def stats(self) -> dict:
        return self.cache.stats()
