"""How the core calls models: `runner(model_name, {input: tensor}, patches=()) -> {output: tensor}`.

The served pipeline binds this to Triton BLS calls; `OnnxRuntimeModels` binds it to in-process
ONNX Runtime sessions over the same .onnx files (the parity reference and the benchmark).

`patches` (optional, a `pipeline.lora` patch set) asks for the leaf with those weight patches
(LoRAs, the inpaint patch and head) merged in; runners that take no patches are called without
the argument (`with_patches`)."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch


class ModelRunner(Protocol):
    def __call__(self, model: str, inputs: dict[str, torch.Tensor], patches: tuple = ()
                 ) -> dict[str, torch.Tensor]: ...


def with_patches(runner: ModelRunner, patches: tuple) -> ModelRunner:
    """`runner` with a task's patch set attached: each leaf gets its part of it (`lora.for_leaf`),
    and leaves it cannot change are called exactly as before."""
    if not patches:
        return runner
    from .lora import for_leaf

    def call(model, inputs):
        part = for_leaf(model, patches)
        return runner(model, inputs, patches=part) if part else runner(model, inputs)

    return call


def ort_session(onnx_path: str | Path | bytes, threads: int | None = None, initializers: dict | None = None,
                external_data_dir: str | Path | None = None):
    """An ONNX Runtime CPU session with the options every part of the project uses, so the served
    leaf models and the in-process reference compute identically. `onnx_path` may be a serialized
    model whose `initializers` ({name: OrtValue}, kept alive by the caller) are external-data
    references (`OnnxWeights.patched_model`); its other external data is read from `external_data_dir`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or int(os.environ.get("ORT_INTRA_OP_THREADS", "0"))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if initializers:
        # Not `add_initializer`: ONNX Runtime's graph optimizations (constant folding, NCHWc conv
        # weights) read the model's own tensors and ignore those overrides. External initializers
        # are bound when the model loads, before any optimization.
        opts.add_external_initializers(list(initializers), list(initializers.values()))
    if external_data_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
    model = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxWeights:
    """A `pipeline.lora.WeightSource` over an .onnx file's initializers (external data read only
    for the tensors asked for). Parameter names are initializer names (export.onnx_export keeps them)."""

    def __init__(self, onnx_path: str | Path):
        import onnx

        self.path = Path(onnx_path)
        self._model = onnx.load(str(self.path), load_external_data=False)
        self._tensors = {t.name: t for t in self._model.graph.initializer}

    def names(self):
        return self._tensors.keys()

    def shape(self, name):
        t = self._tensors.get(name)
        return tuple(t.dims) if t is not None else None

    def dtype(self, name):
        from onnx import helper

        return helper.tensor_dtype_to_np_dtype(self._tensors[name].data_type)

    def value(self, name):
        from onnx import numpy_helper

        return torch.from_numpy(numpy_helper.to_array(self._tensors[name], base_dir=str(self.path.parent)).copy()).float()

    def patched_model(self, updates: dict) -> tuple[bytes, dict]:
        """(the model serialized with each updated initializer turned into an external-data
        reference, {name: OrtValue} to bind to them): for `ort_session(bytes, initializers=...)`.
        Consumes this object's copy of the model."""
        import onnx
        import onnxruntime as ort

        values = {}
        for name, value in updates.items():
            array = np.ascontiguousarray(value.detach().cpu().numpy().astype(self.dtype(name), copy=False))
            tensor = self._tensors[name]
            for field_name in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
                tensor.ClearField(field_name)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, val in (("location", "weight-patches.bin"), ("offset", "0"), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, val
            values[name] = ort.OrtValue.ortvalue_from_numpy(array)
        data = self._model.SerializeToString()
        self._model, self._tensors = None, {}
        return data, values


class PatchedSessions:
    """ONNX Runtime sessions for one leaf's .onnx file: the base session, and one per patch set
    with the patched weights passed as initializer overrides, LRU-cached (`cache_size` patched
    sessions besides the base; `FOOOCUS_PATCHED_SESSIONS`, default 2) so that repeated requests
    with the same LoRAs do not merge again. Shared by `OnnxRuntimeModels` and the python-ort
    Triton leaf. `stats()`: hits, misses (merges), evictions, cached."""

    def __init__(self, onnx_path: str | Path, leaf: str, threads: int | None = None, cache_size: int | None = None):
        from .lora import MergedCache, cache_size_from

        self.path, self.leaf, self.threads = Path(onnx_path), leaf, threads
        self.base = ort_session(self.path, threads)
        self.cache = MergedCache(cache_size_from(cache_size))
        self.last = "base"

    def session(self, patches: tuple = ()):
        """The session to run for `patches` (the base one when they change nothing here)."""
        from .lora import for_leaf

        patches = for_leaf(self.leaf, patches)
        if not patches:
            self.last = "base"
            return self.base
        (session, _values), self.last = self.cache.get(patches, lambda: self._build(patches))
        return session

    def _build(self, patches):
        from .lora import leaf_updates

        weights = OnnxWeights(self.path)
        updates, _ = leaf_updates(self.leaf, patches, weights)
        if not updates:
            return self.base, {}
        model, values = weights.patched_model(updates)
        session = ort_session(model, self.threads, values, external_data_dir=self.path.parent)
        return session, values  # the OrtValues live as long as the session

    def stats(self) -> dict:
        return self.cache.stats()


class OnnxRuntimeModels:
    """In-process runner over `<onnx_dir>/<model>.onnx`."""

    def __init__(self, onnx_dir: str | Path, threads: int | None = None, cache_size: int | None = None):
        self.onnx_dir = Path(onnx_dir)
        self.threads = threads
        self.cache_size = cache_size
        self.sessions: dict[str, PatchedSessions] = {}
        self._lock = threading.Lock()

    def __call__(self, model: str, inputs: dict[str, torch.Tensor], patches: tuple = ()) -> dict[str, torch.Tensor]:
        with self._lock:
            if model not in self.sessions:
                self.sessions[model] = PatchedSessions(self.onnx_dir / f"{model}.onnx", model, self.threads,
                                                       self.cache_size)
        session = self.sessions[model].session(patches)
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in inputs.items()}
        names = [o.name for o in session.get_outputs()]
        return {n: torch.from_numpy(v) for n, v in zip(names, session.run(names, feeds))}
