"""How the core calls models: `runner(model_name, {input: tensor}) -> {output: tensor}`.

The served pipeline binds this to Triton BLS calls; `OnnxRuntimeModels` binds it to in-process
ONNX Runtime sessions over the same .onnx files (the parity reference and the benchmark)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch


class ModelRunner(Protocol):
    def __call__(self, model: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def ort_session(onnx_path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session with the options every part of the project uses, so the served
    leaf models and the in-process reference compute identically."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or int(os.environ.get("ORT_INTRA_OP_THREADS", "0"))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxRuntimeModels:
    """In-process runner over `<onnx_dir>/<model>.onnx`."""

    def __init__(self, onnx_dir: str | Path, threads: int | None = None):
        self.onnx_dir = Path(onnx_dir)
        self.threads = threads
        self._sessions: dict = {}

    def __call__(self, model: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if model not in self._sessions:
            self._sessions[model] = ort_session(self.onnx_dir / f"{model}.onnx", self.threads)
        session = self._sessions[model]
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in inputs.items()}
        names = [o.name for o in session.get_outputs()]
        return {n: torch.from_numpy(v) for n, v in zip(names, session.run(names, feeds))}
