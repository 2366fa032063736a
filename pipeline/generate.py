"""Text to image, Fooocus's way: one full diffusion run per image (batch 1, CFG folded into a
batch of 2), seeds s, s+1, ..., a progress event per step and the decoded image at the end."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .interfaces import UNET, VAE_DECODER, ModelDims
from .models import ModelRunner
from .samplers import SAMPLERS, SDE_SAMPLERS, BrownianTreeNoise
from .errors import UnsupportedFeature
from .guidance import adm_emphasized, adm_time_ids, guided_denoised
from .schedules import SDXL_SCHEDULE, DiscreteSchedule, calculate_sigmas
from .task import GenerationTask
from .text import ClipTokenizer, encode_prompt, match_lengths

# Fooocus's progress bar: 0-15 % preparation, 15-100 % sampling steps across all images.
PROGRESS_SAMPLING_START = 15

Emit = Callable[[dict, "np.ndarray | None"], None]


class Cancelled(Exception):
    """The caller asked to stop (Triton request cancellation / stop route)."""


@dataclass
class Pipeline:
    """The generation core bound to a set of models."""

    models: ModelRunner
    tokenizer: ClipTokenizer
    dims: ModelDims
    schedule: DiscreteSchedule = SDXL_SCHEDULE

    @classmethod
    def from_dir(cls, pipeline_dir: str | Path, models: ModelRunner) -> "Pipeline":
        """`pipeline_dir` is what the exporter writes: model_info.json and tokenizer.json."""
        pipeline_dir = Path(pipeline_dir)
        info = json.loads((pipeline_dir / "model_info.json").read_text())
        return cls(models, ClipTokenizer(pipeline_dir / "tokenizer.json"), ModelDims.from_json(info["dims"]))

    def run(self, task: GenerationTask, emit: Emit, is_cancelled: Callable[[], bool] = lambda: False) -> None:
        """Generate every image of the task. Emits progress events and, per image, a result event
        with the HxWx3 uint8 image. Raises Cancelled, UnsupportedFeature or ValueError."""
        task.validate(int(self.dims.extra.get("size_multiple", self.dims.vae_scale_factor)))
        sampler = SAMPLERS.get(task.sampler)
        if sampler is None:
            raise UnsupportedFeature(f"sampler '{task.sampler}' is not supported by this server yet")
        width, height = task.size
        steps = task.steps
        seeds = task.image_seeds()
        sigmas = calculate_sigmas(task.scheduler, steps, schedule=self.schedule)
        total_steps = steps * len(seeds)

        emit({"type": "progress", "progress": 1, "status": "Initializing ..."}, None)
        cond, pooled = encode_prompt(task.prompt, self.tokenizer, self.models, task.clip_skip)
        if task.cfg == 1.0:  # Fooocus never encodes the negative prompt at CFG 1
            uncond, pooled_neg = cond, pooled
        else:
            uncond, pooled_neg = encode_prompt(task.negative_prompt, self.tokenizer, self.models, task.clip_skip)
        cond, uncond = match_lengths(cond, uncond)
        denoise = self._denoiser(task, cond, uncond, pooled, pooled_neg, width, height)

        for index, seed in enumerate(seeds):
            if is_cancelled():
                raise Cancelled()
            emit({"type": "progress", "progress": PROGRESS_SAMPLING_START + (85 * steps * index) // total_steps,
                  "status": f"Preparing task {index + 1}/{len(seeds)} ..."}, None)
            latent_shape = (1, self.dims.latent_channels, height // self.dims.vae_scale_factor,
                            width // self.dims.vae_scale_factor)
            noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            x = noise * initial_noise_scale(sigmas, self.schedule)
            noise_sampler = None
            if task.sampler in SDE_SAMPLERS:
                positive = sigmas[sigmas > 0]
                noise_sampler = BrownianTreeNoise(x, float(positive.min()), float(positive.max()), seed)

            def on_step(i, _x, _denoised, index=index):
                if is_cancelled():
                    raise Cancelled()
                done = steps * index + i + 1
                emit({"type": "progress", "progress": PROGRESS_SAMPLING_START + (85 * done) // total_steps,
                      "status": f"Step {i + 1}/{steps} in the {index + 1}-th Sampling",
                      "step": i + 1, "steps": steps, "image_index": index}, None)

            latent = sampler(denoise, x, sigmas, callback=on_step, noise_sampler=noise_sampler)
            image = self.decode(latent)
            emit({"type": "result", "image_index": index, "seed": str(seed), "width": width, "height": height,
                  "steps": steps, "sampler": task.sampler, "scheduler": task.scheduler}, image)

    def _denoiser(self, task: GenerationTask, cond, uncond, pooled, pooled_neg, width: int, height: int):
        """D(x, sigma): Fooocus's guidance around one UNet call (CFG folded into a batch of 2)."""
        schedule = self.schedule
        cfg, sharpness, adaptive = task.cfg, task.sharpness_value, task.adaptive_cfg
        adm_pos, adm_neg, adm_end = task.adm_scalers
        emph_pos, emph_neg, consistent = adm_time_ids(width, height, adm_pos, adm_neg)
        single = cfg == 1.0  # Fooocus evaluates only the positive prompt at CFG 1
        context = cond if single else torch.cat([cond, uncond])
        text_embeds = pooled if single else torch.cat([pooled, pooled_neg])

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            timestep = schedule.timestep(sigma.reshape(1))
            emphasized = adm_emphasized(float(timestep), adm_end)
            ids_pos = emph_pos if emphasized else consistent
            ids = ids_pos if single else torch.cat([ids_pos, emph_neg if emphasized else consistent])
            c_in = 1.0 / torch.sqrt(sigma**2 + 1.0)
            batch = context.shape[0]
            eps = self.models(UNET, {
                "sample": (x * c_in).repeat(batch, 1, 1, 1), "timestep": timestep.repeat(batch),
                "encoder_hidden_states": context, "text_embeds": text_embeds, "time_ids": ids,
            })["noise_pred"]
            denoised = x - sigma * eps
            if single:
                return denoised
            return guided_denoised(x, denoised[:1], denoised[1:], cfg, float(timestep), sharpness, adaptive)

        return denoise

    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """Latent -> HxWx3 uint8 (Fooocus truncates 255 * clamp((x + 1) / 2, 0, 1))."""
        image = self.models(VAE_DECODER, {"latent": latent / self.dims.vae_scaling_factor})["image"]
        image = torch.clamp((image[0] + 1.0) / 2.0, 0.0, 1.0)
        return np.clip(255.0 * image.permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)


def initial_noise_scale(sigmas: torch.Tensor, schedule: DiscreteSchedule) -> torch.Tensor:
    """Full denoise starts from variance 1 + sigma_max^2 (the model's noised-data variance);
    a partial one from sigma_0."""
    sigma0 = sigmas[0]
    if float(sigma0) >= schedule.sigma_max - 1e-5:
        return torch.sqrt(1.0 + sigma0**2)
    return sigma0
