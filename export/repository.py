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

import dataclasses
import json
import re
import shutil
from pathlib import Path

from pipeline.interfaces import (PIPELINE_SPEC, PROMPT_EXPANSION, UNET, UPSCALER, ModelDims, ModelSpec, TensorSpec,
                                 leaf_specs)

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


def refiner_leaf_name(file_name: str) -> str:
    """The Triton model name of a refiner checkpoint's UNet: `unet__<file stem, sanitised>`."""
    return f"{UNET}__" + re.sub(r"[^A-Za-z0-9_-]", "_", Path(file_name).stem)


def write_repository(repo: Path, onnx_paths: dict[str, Path] | None, dims: ModelDims, tokenizer_json: Path,
                     target: str = "python-ort", checkpoint_name: str = "", max_concurrent_jobs: int = 4,
                     device: str = "cpu", checkpoint_dir: Path | None = None,
                     styles_dir: Path | None = None, wildcards_dir: Path | None = None,
                     loras_dir: Path | None = None, expansion_tokenizer: Path | None = None,
                     expansion_words: Path | None = None, expansion_model: Path | None = None,
                     refiners: dict[str, Path] | None = None, inpaint_dir: Path | None = None) -> Path:
    """onnx_paths for the ONNX-based targets; checkpoint_dir (a diffusers folder) for python-torch.
    styles_dir (Fooocus-format style JSON files) and wildcards_dir (name.txt files) extend the
    pipeline's built-in styles and wildcards; loras_dir is where LoRA names resolve to files
    (without it: FOOOCUS_LORAS_DIR, else models/loras under the project root).
    expansion_tokenizer / expansion_words (export.expansion) go beside the pipeline's tokenizer.json
    as expansion_tokenizer.json / expansion_words.txt; expansion_model (python-torch) is a GPT-2
    folder that is not checkpoint_dir's prompt_expansion/: it is copied into the leaf's version folder.
    refiners ({checkpoint file name: its unet.onnx}; ONNX targets) add refiner UNet leaves
    (`refiner_leaf_name`): SDXL-base-type checkpoints whose UNet takes the base's conditioning (Fooocus
    reuses the base's text encoders and VAE for them). inpaint_dir holds Fooocus's inpaint engine
    files (fooocus_inpaint_head.pth, inpaint_v26.fooocus.patch, ...)."""
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
        if target == "python-torch" and name == UPSCALER:
            # Checkpoint-independent: the converted weights travel with the repository.
            from pipeline.torch_leaves import UPSCALER_WEIGHTS

            from .realesrgan import converted_weights

            shutil.copy2(converted_weights(), version / UPSCALER_WEIGHTS)
            checkpoint = str(version.resolve())
        if target == "python-torch" and name == PROMPT_EXPANSION and expansion_model is not None:
            from pipeline.torch_leaves import COMPONENT_OF  # the leaf loads <checkpoint>/prompt_expansion

            shutil.copytree(expansion_model, version / COMPONENT_OF[name], dirs_exist_ok=True)
            checkpoint = str(version.resolve())
        (repo / name / "config.pbtxt").write_text(leaf_config(specs[name], target, device, checkpoint))
    refiner_leaves = {}
    for file_name, unet_onnx in (refiners or {}).items():
        if target == "python-torch":
            raise ValueError("refiners are served by the ONNX-based targets (python-ort, onnxruntime, tensorrt)")
        leaf = refiner_leaf_name(file_name)
        refiner_leaves[file_name] = leaf
        version = repo / leaf / "1"
        version.mkdir(parents=True, exist_ok=True)
        shutil.copy2(unet_onnx, version / "model.onnx")
        if Path(str(unet_onnx) + ".data").exists():
            shutil.copy2(Path(str(unet_onnx) + ".data"), version / (Path(unet_onnx).name + ".data"))
        if target == "python-ort":
            shutil.copy2(PROJECT_MODELS / "python_ort_leaf" / "1" / "model.py", version / "model.py")
        config = leaf_config(dataclasses.replace(specs[UNET], name=leaf), target, device)
        if target == "python-ort":  # the leaf's role (which weights LoRAs patch)
            config += f'parameters {{\n  key: "leaf"\n  value: {{ string_value: "{UNET}" }}\n}}\n'
        (repo / leaf / "config.pbtxt").write_text(config)
    if target == "tensorrt":
        from .tensorrt import leaf_profiles

        profiles = leaf_profiles(dims)
        profiles.update({leaf: profiles[UNET] for leaf in refiner_leaves.values()})
        (repo / "trt_profiles.json").write_text(json.dumps(profiles, indent=1))
    version = repo / PIPELINE_SPEC.name / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PROJECT_MODELS / PIPELINE_SPEC.name / "1" / "model.py", version / "model.py")
    shutil.copy2(tokenizer_json, version / "tokenizer.json")
    for source, file_name in ((expansion_tokenizer, "expansion_tokenizer.json"),
                              (expansion_words, "expansion_words.txt")):
        if source is not None:  # pipeline.generate.Pipeline.from_dir reads them
            shutil.copyfile(source, version / file_name)
    (version / "model_info.json").write_text(json.dumps(
        {"checkpoint": checkpoint_name, "target": target, "dims": dims.to_json(), "refiners": refiner_leaves},
        indent=2))
    pipeline_params = {"max_concurrent_jobs": max_concurrent_jobs}
    for key, folder in (("styles_dir", styles_dir), ("wildcards_dir", wildcards_dir), ("loras_dir", loras_dir),
                        ("inpaint_dir", inpaint_dir)):
        if folder is not None:
            pipeline_params[key] = str(Path(folder).resolve())
    if device == "gpu" and target != "python-ort":
        pipeline_params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    (repo / PIPELINE_SPEC.name / "config.pbtxt").write_text(model_config(
        PIPELINE_SPEC, backend="python", decoupled=True, parameters=pipeline_params))
    return repo
