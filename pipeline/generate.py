"""Text to image, Fooocus's way: one full diffusion run per image (batch 1, CFG folded into a
batch of 2), seeds s, s+1, ..., a progress event per step and the decoded image at the end."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .interfaces import UNET, VAE_DECODER, ModelDims
from .models import ModelRunner
from .errors import UnsupportedFeature
from .guidance import adm_emphasized, adm_time_ids, guided_denoised
from .previews import preview_png_b64
from .prompts import WildcardLibrary, process_prompts
from .samplers import ANCESTRAL_SAMPLERS, SAMPLERS, SCHEDULE_SAMPLERS, SDE_SAMPLERS, BrownianTreeNoise
from .schedules import DiscreteSchedule, calculate_sigmas, lcm_denoised, model_sampling_for
from .styles import EXPANSION_STYLE, StyleLibrary
from .task import GenerationTask
from .text import ClipTokenizer, PromptEncoder, match_lengths

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
    styles: StyleLibrary = field(default_factory=StyleLibrary.builtin)
    wildcards: WildcardLibrary | None = None

    @classmethod
    def from_dir(cls, pipeline_dir: str | Path, models: ModelRunner, styles_dir: str | Path | None = None,
                 wildcards_dir: str | Path | None = None) -> "Pipeline":
        """`pipeline_dir` is what the exporter writes: model_info.json and tokenizer.json. Optional
        folders of Fooocus-format style files and of wildcard files extend the built-ins."""
        pipeline_dir = Path(pipeline_dir)
        info = json.loads((pipeline_dir / "model_info.json").read_text())
        return cls(models, ClipTokenizer(pipeline_dir / "tokenizer.json"), ModelDims.from_json(info["dims"]),
                   StyleLibrary.from_folder(styles_dir), WildcardLibrary.from_dir(wildcards_dir))

    def run(self, task: GenerationTask, emit: Emit, is_cancelled: Callable[[], bool] = lambda: False) -> None:
        """Generate every image of the task. Emits progress events and, per image, a result event
        with the HxWx3 uint8 image. Raises Cancelled, UnsupportedFeature or ValueError."""
        task.validate(int(self.dims.extra.get("size_multiple", self.dims.vae_scale_factor)))
        sampler = SAMPLERS.get(task.sampler)
        if sampler is None:
            raise UnsupportedFeature(f"sampler '{task.sampler}' is not supported by this server yet")
        schedule, parameterisation = model_sampling_for(task.scheduler)
        if parameterisation == "edm":
            raise UnsupportedFeature("the edm_playground_v2.5 scheduler needs a Playground v2.5 checkpoint "
                                     "(EDM model and latent format), which this server does not serve")
        width, height = task.size
        seeds = task.image_seeds()
        sigmas = calculate_sigmas(task.scheduler, task.steps, schedule=schedule, sampler=task.sampler)
        steps = len(sigmas) - 1  # ddim_uniform and turbo may differ from the requested count
        total_steps = steps * len(seeds)
        previews = not task.adv("disable_preview", False)

        emit({"type": "progress", "progress": 1, "status": "Initializing ..."}, None)
        fields = {**task.extra, "prompt": task.prompt, "negative_prompt": task.negative_prompt,
                  "advanced_params": task.advanced_params}
        encoder = PromptEncoder(self.tokenizer, self.models, task.clip_skip)  # caches texts for this task
        plans = [process_prompts(fields, i, s, self.styles, self.wildcards) for i, s in enumerate(seeds)]

        for index, (seed, plan) in enumerate(zip(seeds, plans)):
            if is_cancelled():
                raise Cancelled()
            emit({"type": "progress", "progress": PROGRESS_SAMPLING_START + (85 * steps * index) // total_steps,
                  "status": f"Preparing task {index + 1}/{len(seeds)} ..."}, None)
            cond, pooled = encoder(plan.positive_texts, plan.positive_top_k)
            if abs(task.cfg - 1.0) < 1e-4:  # Fooocus never encodes the negative prompt at CFG 1
                uncond, pooled_neg = cond, pooled
            else:
                uncond, pooled_neg = encoder(plan.negative_texts, plan.negative_top_k)
            cond, uncond = match_lengths(cond, uncond)
            denoise = self._denoiser(task, schedule, parameterisation, cond, uncond, pooled, pooled_neg,
                                     width, height)
            latent_shape = (1, self.dims.latent_channels, height // self.dims.vae_scale_factor,
                            width // self.dims.vae_scale_factor)
            # One generator per image: the initial latent, then (ancestral samplers) each step's noise.
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32)
            x = noise * initial_noise_scale(sigmas, schedule)
            kwargs = {}
            if task.sampler in SDE_SAMPLERS:
                positive = sigmas[sigmas > 0]
                kwargs["noise_sampler"] = BrownianTreeNoise(x, float(positive.min()), float(positive.max()), seed)
            elif task.sampler in ANCESTRAL_SAMPLERS:
                kwargs["generator"] = generator
            if task.sampler in SCHEDULE_SAMPLERS:
                kwargs["schedule"] = schedule

            def on_step(i, _x, denoised, index=index):
                if is_cancelled():
                    raise Cancelled()
                step = min(i + 1, steps)  # adaptive samplers may call back more often than planned
                done = steps * index + step
                event = {"type": "progress", "progress": PROGRESS_SAMPLING_START + (85 * done) // total_steps,
                         "status": f"Step {step}/{steps} in the {index + 1}-th Sampling",
                         "step": step, "steps": steps, "image_index": index}
                if previews:
                    event["preview"] = preview_png_b64(denoised)
                emit(event, None)

            latent = sampler(denoise, x, sigmas, callback=on_step, **kwargs)
            image = self.decode(latent)
            emit({"type": "result", "image_index": index, "seed": str(seed), "width": width, "height": height,
                  "steps": steps, "sampler": task.sampler, "scheduler": task.scheduler,
                  "full_prompt": list(plan.full_prompt), "full_negative_prompt": list(plan.full_negative_prompt),
                  # Fooocus V2 (prompt expansion) is not served yet: no expansion text, and not listed.
                  "styles": [s for s in plan.styles if s != EXPANSION_STYLE]}, image)

    def _denoiser(self, task: GenerationTask, schedule, parameterisation: str, cond, uncond, pooled, pooled_neg,
                  width: int, height: int):
        """D(x, sigma): Fooocus's guidance around one UNet call (CFG folded into a batch of 2)."""
        cfg, sharpness, adaptive = task.cfg, task.sharpness_value, task.adaptive_cfg
        adm_pos, adm_neg, adm_end = task.adm_scalers
        emph_pos, emph_neg, consistent = adm_time_ids(width, height, adm_pos, adm_neg)
        single = abs(cfg - 1.0) < 1e-4  # Fooocus evaluates only the positive prompt at CFG 1
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
            if parameterisation == "lcm":  # LCM's consistency parameterisation (Extreme Speed)
                denoised = lcm_denoised(x, sigma, eps, timestep)
            else:
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
