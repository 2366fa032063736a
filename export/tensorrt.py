"""ONNX -> TensorRT plans for the `tensorrt` target, built where the engines will run (inside the
Triton container on the serving GPU; a plan is specific to the GPU and TensorRT version).

Each leaf gets one optimisation profile whose ranges cover Fooocus's aspect ratios (576..1728 px a
side) and batches of 1..max_batch (CFG doubles the UNet batch; several jobs share calls through
the dynamic batcher), with the I/O in FP32 as `pipeline.interfaces` defines it and FP16 inside.
The VAE stays FP32 unless an fp16-safe VAE is exported (SDXL's VAE overflows in FP16). The UNet
is built refittable, so LoRAs are applied by refitting weights instead of rebuilding. A timing
cache makes rebuilds for the same GPU fast.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import TensorRTUnavailable  # noqa: F401  (defined there: pipeline.trt_runtime raises it too)
from pipeline.interfaces import (LEAF_MAX_BATCH, PROMPT_EXPANSION, TOKENS_PER_CHUNK, UNET, UPSCALER, VAE_DECODER,
                                 VAE_ENCODER, ModelDims, leaf_specs)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileSettings:
    min_side: int = 576  # smallest side of Fooocus's aspect ratios (1728*576)
    max_side: int = 1728  # largest side
    opt_side: int = 1024
    # Per leaf: the profile's max batch, at least the config's max_batch_size (the dynamic batcher
    # merges concurrent jobs' calls up to it; pipeline.interfaces.LEAF_MAX_BATCH).
    max_batch: dict = field(default_factory=lambda: dict(LEAF_MAX_BATCH))
    max_chunks: int = 4  # prompts up to 4 x 75 tokens (the UNet's context length)
    fp16: bool = True
    fp16_vae: bool = False  # only for an fp16-safe VAE
    upscaler_tile: int = 512  # pipeline/upscale.py's tile: one tile (batch 1) per call, any size up to it


def _round(value: int, multiple: int, up: bool) -> int:
    q, r = divmod(value, multiple)
    return (q + (1 if up and r else 0)) * multiple


def leaf_profiles(dims: ModelDims, s: ProfileSettings = ProfileSettings()) -> dict[str, dict[str, tuple]]:
    """{leaf: {input: (min_shape, opt_shape, max_shape)}} for every leaf's inputs."""
    multiple = int(dims.extra.get("size_multiple", dims.vae_scale_factor))
    lo, hi = _round(s.min_side, multiple, True), _round(s.max_side, multiple, False)
    opt = _round(s.opt_side, multiple, False)
    f = dims.vae_scale_factor
    axes = {
        "latent_height": (lo // f, opt // f, hi // f), "latent_width": (lo // f, opt // f, hi // f),
        "height": (lo, opt, hi), "width": (lo, opt, hi),
        "sequence": (TOKENS_PER_CHUNK, TOKENS_PER_CHUNK, TOKENS_PER_CHUNK * s.max_chunks),
    }
    # The expansion GPT-2 runs one prompt at a time over its whole sequence (up to n_positions).
    positions = dims.expansion_positions
    expansion_axes = {"sequence": (1, min(TOKENS_PER_CHUNK, positions), positions)}
    tile = (1, s.upscaler_tile, s.upscaler_tile)  # edge tiles are narrower: down to 1 px for tiny images
    upscaler_axes = {"height": tile, "width": tile}
    out = {}
    for name, spec in leaf_specs(dims).items():
        top = s.max_batch[name]  # one job's call is the common case: a CFG pair for the UNet and VAE
        batch = (1, min(2 if name in (UNET, VAE_ENCODER, VAE_DECODER) else 1, top), top)
        shapes = {}
        for t in spec.inputs:
            triple = []
            for k in range(3):
                shape = []
                for d in t.shape:
                    if isinstance(d, int):
                        shape.append(d)
                    elif d == "batch":
                        shape.append(batch[k])
                    elif name == PROMPT_EXPANSION:
                        shape.append(expansion_axes[d][k])
                    elif name == UPSCALER:
                        shape.append(upscaler_axes[d][k])
                    else:
                        shape.append(axes[d][k])
                triple.append(tuple(shape))
            shapes[t.name] = tuple(triple)
        out[name] = shapes
    return out


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed here. Build engines inside the Triton container on the GPU that "
            "will serve them: see docs/production.md ('python -m export tensorrt ...').") from None
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = True  # let TensorRT itself report a missing GPU
    if not has_gpu:
        raise TensorRTUnavailable("TensorRT is installed but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES?): "
                                  "engines are built on the GPU that will run them.")
    return trt


def build_engine(onnx_path: Path, plan_path: Path, profile: dict[str, tuple], *, fp16: bool,
                 refittable: bool, timing_cache: Path, workspace_gib: float = 8.0) -> Path:
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache_bytes = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    if hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _ProgressBar(trt, onnx_path.stem)
    t0 = time.time()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path}; see the log above")
    plan_path.write_bytes(bytes(plan))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    log.info("built %s in %.0f s (%.1f MB)", plan_path, time.time() - t0, plan_path.stat().st_size / 1e6)
    return plan_path


def _ProgressBar(trt, label: str):
    from tqdm import tqdm

    class ProgressBar(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = tqdm(total=num_steps, desc=f"{label}: {phase_name}", leave=False)

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step - bar.n + 1)
            return True

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return ProgressBar()


def build_repository_engines(repo: Path, timing_cache: Path, settings: ProfileSettings = ProfileSettings()) -> None:
    """Build `<leaf>/1/model.plan` from `<leaf>/1/model.onnx` for every leaf of a `tensorrt`
    repository, with the profiles recorded in its `trt_profiles.json`. The leaves that take weight
    patches (text encoders, UNet, refiner UNets: `pipeline.trt_runtime.refit_role`) are built
    refittable; python_trt_leaf refits copies of them per patch set."""
    from pipeline.trt_runtime import refit_role

    _tensorrt()  # fail before any work when there is no TensorRT or GPU
    profiles = json.loads((repo / "trt_profiles.json").read_text())
    for name, profile in profiles.items():
        version = repo / name / "1"
        fp16 = settings.fp16 if name not in (VAE_ENCODER, VAE_DECODER) else settings.fp16_vae
        build_engine(version / "model.onnx", version / "model.plan",
                     {k: tuple(tuple(s) for s in v) for k, v in profile.items()},
                     fp16=fp16, refittable=refit_role(name) is not None, timing_cache=timing_cache)
