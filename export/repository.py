"""Write a Triton model repository for a target from exported ONNX files.

Targets (see docs/architecture.md); the pipeline (BLS) model is the same for every target:
  python-ort   the bundled CPU Triton (python backend only): each leaf is a python model that runs
               its .onnx with ONNX Runtime.
  onnxruntime  Triton's onnxruntime backend (official container), on CPU or GPU.
  tensorrt     Triton's TensorRT backend: `<leaf>/1/model.plan`, built from the `model.onnx` beside
               it on the serving GPU by `python -m export tensorrt` (profiles in trt_profiles.json).
  python-torch each leaf is a python model running the checkpoint's torch module (CUDA fp16 where a
               GPU is, else CPU fp32): the GPU path for machines without TensorRT.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.interfaces import PIPELINE_SPEC, ModelDims, ModelSpec, TensorSpec, leaf_specs

PROJECT_MODELS = Path(__file__).resolve().parent.parent / "model_repository"
TARGETS = ("python-ort", "onnxruntime", "tensorrt", "python-torch")

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "object": "TYPE_STRING"}


def _dims(spec: TensorSpec) -> str:
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in spec.shape)


def _tensors(kind: str, specs) -> str:
    body = ",\n".join(
        f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_DTYPES[t.dtype]}\n    dims: [ {_dims(t)} ]\n  }}'
        for t in specs)
    return f"{kind} [\n{body}\n]\n"


def model_config(spec: ModelSpec, backend: str | None = None, platform: str | None = None, instances: int = 1,
                 kind: str = "KIND_CPU", decoupled: bool = False, parameters: dict | None = None) -> str:
    """config.pbtxt text. Batching is left to the pipeline (max_batch_size 0: every axis explicit)."""
    text = f'name: "{spec.name}"\n'
    text += f'backend: "{backend}"\n' if backend else f'platform: "{platform}"\n'
    text += "max_batch_size: 0\n"
    text += _tensors("input", spec.inputs) + _tensors("output", spec.outputs)
    text += f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
    if decoupled:
        text += "model_transaction_policy {\n  decoupled: true\n}\n"
    for key, value in (parameters or {}).items():
        text += f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
    return text


def leaf_config(spec: ModelSpec, target: str, device: str, checkpoint: str = "") -> str:
    if target == "python-ort":
        return model_config(spec, backend="python")
    if target == "python-torch":
        gpu = device == "gpu"
        return model_config(spec, backend="python", kind="KIND_GPU" if gpu else "KIND_CPU", parameters={
            "checkpoint": checkpoint, "device": "cuda" if gpu else "cpu", "dtype": "float16" if gpu else "float32",
            # GPU inputs stay on the GPU (DLPack) instead of being copied to the host first.
            "FORCE_CPU_ONLY_INPUT_TENSORS": "no" if gpu else "yes"})
    if target == "onnxruntime":
        return model_config(spec, platform="onnxruntime_onnx", kind="KIND_GPU" if device == "gpu" else "KIND_CPU")
    return model_config(spec, platform="tensorrt_plan", kind="KIND_GPU")


def write_repository(repo: Path, onnx_paths: dict[str, Path] | None, dims: ModelDims, tokenizer_json: Path,
                     target: str = "python-ort", checkpoint_name: str = "", max_concurrent_jobs: int = 4,
                     device: str = "cpu", checkpoint_dir: Path | None = None,
                     styles_dir: Path | None = None, wildcards_dir: Path | None = None) -> Path:
    """onnx_paths for the ONNX-based targets; checkpoint_dir (a diffusers folder) for python-torch.
    styles_dir (Fooocus-format style JSON files) and wildcards_dir (name.txt files) extend the
    pipeline's built-in styles and wildcards."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be cpu or gpu, got {device!r}")
    repo.mkdir(parents=True, exist_ok=True)
    specs = leaf_specs(dims)  # the SDXL leaves, plus prompt_expansion when the checkpoint has one
    for name in specs:
        version = repo / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        if target == "python-torch":
            shutil.copy2(PROJECT_MODELS / "python_torch_leaf" / "1" / "model.py", version / "model.py")
        else:
            shutil.copy2(onnx_paths[name], version / "model.onnx")
            weights = Path(str(onnx_paths[name]) + ".data")  # external weights of a >1 GiB model keep
            if weights.exists():                              # the file name the graph refers to
                shutil.copy2(weights, version / weights.name)
        if target == "python-ort":
            shutil.copy2(PROJECT_MODELS / "python_ort_leaf" / "1" / "model.py", version / "model.py")
        checkpoint = str(Path(checkpoint_dir).resolve()) if checkpoint_dir else ""
        (repo / name / "config.pbtxt").write_text(leaf_config(specs[name], target, device, checkpoint))
    if target == "tensorrt":
        from .tensorrt import leaf_profiles

        (repo / "trt_profiles.json").write_text(json.dumps(leaf_profiles(dims), indent=1))
    version = repo / PIPELINE_SPEC.name / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PROJECT_MODELS / PIPELINE_SPEC.name / "1" / "model.py", version / "model.py")
    shutil.copy2(tokenizer_json, version / "tokenizer.json")
    (version / "model_info.json").write_text(json.dumps(
        {"checkpoint": checkpoint_name, "target": target, "dims": dims.to_json()}, indent=2))
    pipeline_params = {"max_concurrent_jobs": max_concurrent_jobs}
    for key, folder in (("styles_dir", styles_dir), ("wildcards_dir", wildcards_dir)):
        if folder is not None:
            pipeline_params[key] = str(Path(folder).resolve())
    if device == "gpu" and target != "python-ort":
        pipeline_params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    (repo / PIPELINE_SPEC.name / "config.pbtxt").write_text(model_config(
        PIPELINE_SPEC, backend="python", decoupled=True, parameters=pipeline_params))
    return repo
