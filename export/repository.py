"""Write a Triton model repository for a target from exported ONNX files.

Targets (see docs/architecture.md); the pipeline (BLS) model is the same for every target:
  python-ort   the bundled CPU Triton (python backend only): each leaf is a python model that runs
               its .onnx with ONNX Runtime.
  onnxruntime  Triton's onnxruntime backend (official container), on CPU or GPU.
  tensorrt     TensorRT plans `<leaf>/1/model.plan`, built from the `model.onnx` beside each on the
               serving GPU by `python -m export tensorrt` (profiles in trt_profiles.json): the VAE,
               upscaler and expansion on Triton's TensorRT backend; the text encoders and UNets
               (refittable, for LoRAs) on the python_trt_leaf model (pipeline.trt_runtime).
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
                                 leaf_max_batch, leaf_specs)
from pipeline.trt_runtime import refit_role

PROJECT_MODELS = Path(__file__).resolve().parent.parent / "model_repository"
TARGETS = ("python-ort", "onnxruntime", "tensorrt", "python-torch")

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "object": "TYPE_STRING"}


# Triton's dynamic batcher waits up to this long (microseconds) after a leaf request arrives for
# other jobs' requests to batch with it (`--batch-delay-us`). It keeps jobs that reach a step
# together in step (their calls arrive a few ms apart: the BLS threads share one Python
# interpreter; with 0 they fall into taking turns); a job running alone pays it on every call.
# CPU server: 2 ms made two jobs share every UNet call in most runs (measured, docs/production.md).
# GPU: 2 ms is ~3-4 % of an SDXL UNet step at 1024x1024 (50-70 ms).
BATCH_DELAY_US = {"cpu": 2000, "gpu": 2000}


# Leaves called many times in a row by one job, whose calls rarely line up across jobs: the prompt
# expansion runs one call per generated token (a sequence one longer each time). They batch only
# what is already queued, never wait.
NO_BATCH_DELAY = (PROMPT_EXPANSION,)


def default_batch_delay_us(target: str, device: str) -> int:
    """The queue delay a target's leaves get unless `--batch-delay-us` says otherwise."""
    return BATCH_DELAY_US["gpu" if device == "gpu" and target != "python-ort" else "cpu"]


def _dims(spec: TensorSpec, batched: bool) -> str:
    shape = spec.shape[1:] if batched else spec.shape
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) if shape else "1"


def _tensors(kind: str, specs, batched: bool = False) -> str:
    # A batched tensor whose only axis is the batch ([B]) is written dims [1] reshaped to []:
    # Triton wants a non-batch dim; requests send [B, 1] (pipeline.batching.BatchLimitedRunner).
    body = ",\n".join(
        f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_DTYPES[t.dtype]}\n    dims: [ {_dims(t, batched)} ]\n'
        + ("    reshape: { shape: [ ] }\n" if batched and len(t.shape) == 1 else "") + "  }"
        for t in specs)
    return f"{kind} [\n{body}\n]\n"


def model_config(spec: ModelSpec, backend: str | None = None, platform: str | None = None, instances: int = 1,
                 kind: str = "KIND_CPU", decoupled: bool = False, parameters: dict | None = None,
                 max_batch: int = 0, batch_delay_us: int = 0) -> str:
    """config.pbtxt text. `max_batch` 0: every axis explicit (the pipeline model). `max_batch` > 0
    (leaves): the spec's first axis is Triton's batch axis (left out of `dims`), and with
    `max_batch` > 1 the dynamic batcher merges concurrent requests up to it, waiting up to
    `batch_delay_us` for them."""
    batched = max_batch > 0
    if batch_delay_us < 0:
        raise ValueError(f"batch_delay_us must be >= 0, got {batch_delay_us}")
    if batched and any(t.shape[0] != "batch" for t in (*spec.inputs, *spec.outputs)):
        raise ValueError(f"{spec.name}: a batched model needs 'batch' as every tensor's first axis")
    text = f'name: "{spec.name}"\n'
    text += f'backend: "{backend}"\n' if backend else f'platform: "{platform}"\n'
    text += f"max_batch_size: {max_batch}\n"
    text += _tensors("input", spec.inputs, batched) + _tensors("output", spec.outputs, batched)
    text += f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
    if max_batch > 1:
        text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(batch_delay_us)}\n}}\n"
    if decoupled:
        text += "model_transaction_policy {\n  decoupled: true\n}\n"
    for key, value in (parameters or {}).items():
        text += f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
    return text


def leaf_config(spec: ModelSpec, target: str, device: str, checkpoint: str = "", max_batch: int | None = None,
                batch_delay_us: int | None = None) -> str:
    """A leaf's config.pbtxt. `max_batch`: default `leaf_max_batch(spec.name)` (pass the role's for
    a leaf named otherwise, e.g. a refiner UNet); `batch_delay_us`: default `default_batch_delay_us`."""
    delay = default_batch_delay_us(target, device) if batch_delay_us is None else batch_delay_us
    if spec.name in NO_BATCH_DELAY:
        delay = 0
    batching = {"max_batch": leaf_max_batch(spec.name) if max_batch is None else max_batch, "batch_delay_us": delay}
    if target == "python-ort":
        return model_config(spec, backend="python", **batching)
    if target == "python-torch":
        gpu = device == "gpu"
        return model_config(spec, backend="python", kind="KIND_GPU" if gpu else "KIND_CPU", parameters={
            "checkpoint": checkpoint, "device": "cuda" if gpu else "cpu", "dtype": "float16" if gpu else "float32",
            # GPU inputs stay on the GPU (DLPack) instead of being copied to the host first.
            "FORCE_CPU_ONLY_INPUT_TENSORS": "no" if gpu else "yes"}, **batching)
    if target == "onnxruntime":
        return model_config(spec, platform="onnxruntime_onnx", kind="KIND_GPU" if device == "gpu" else "KIND_CPU",
                            **batching)
    role = refit_role(spec.name)
    if role is not None:  # patchable leaves: refittable plans run by python_trt_leaf (pipeline.trt_runtime)
        return model_config(spec, backend="python", kind="KIND_GPU", parameters={
            "leaf": role, "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}, **batching)
    return model_config(spec, platform="tensorrt_plan", kind="KIND_GPU", **batching)


def refiner_leaf_name(file_name: str) -> str:
    """The Triton model name of a refiner checkpoint's UNet: `unet__<file stem, sanitised>`."""
    return f"{UNET}__" + re.sub(r"[^A-Za-z0-9_-]", "_", Path(file_name).stem)


def write_repository(repo: Path, onnx_paths: dict[str, Path] | None, dims: ModelDims, tokenizer_json: Path,
                     target: str = "python-ort", checkpoint_name: str = "", max_concurrent_jobs: int = 4,
                     device: str = "cpu", checkpoint_dir: Path | None = None,
                     styles_dir: Path | None = None, wildcards_dir: Path | None = None,
                     loras_dir: Path | None = None, expansion_tokenizer: Path | None = None,
                     expansion_words: Path | None = None, expansion_model: Path | None = None,
                     refiners: dict[str, Path] | None = None, inpaint_dir: Path | None = None,
                     batch_delay_us: int | None = None) -> Path:
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
    files (fooocus_inpaint_head.pth, inpaint_v26.fooocus.patch, ...). batch_delay_us: the leaves'
    dynamic-batcher queue delay (default `default_batch_delay_us(target, device)`)."""
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
        if target == "tensorrt" and refit_role(name):
            shutil.copy2(PROJECT_MODELS / "python_trt_leaf" / "1" / "model.py", version / "model.py")
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
        (repo / name / "config.pbtxt").write_text(leaf_config(specs[name], target, device, checkpoint,
                                                              batch_delay_us=batch_delay_us))
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
        if target == "tensorrt":
            shutil.copy2(PROJECT_MODELS / "python_trt_leaf" / "1" / "model.py", version / "model.py")
        config = leaf_config(dataclasses.replace(specs[UNET], name=leaf), target, device,
                             max_batch=leaf_max_batch(UNET), batch_delay_us=batch_delay_us)
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
    kind = "KIND_CPU"
    if target == "tensorrt" or (device == "gpu" and target != "python-ort"):
        # The BLS on the GPU: the core's tensors live there and cross to the leaves by DLPack
        # (pipeline.generate.Pipeline.device; model_repository/fooocus_pipeline).
        kind = "KIND_GPU"
        pipeline_params["device"] = "cuda"
        pipeline_params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    (repo / PIPELINE_SPEC.name / "config.pbtxt").write_text(model_config(
        PIPELINE_SPEC, backend="python", kind=kind, decoupled=True, parameters=pipeline_params))
    return repo
