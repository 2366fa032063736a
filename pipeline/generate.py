"""Text to image, Fooocus's way: one full diffusion run per image (batch 1, CFG folded into a
batch of 2), seeds s, s+1, ..., a progress event per step and the decoded image at the end."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .expansion import ExpansionTokenizer, PromptExpander, read_words
from .interfaces import PROMPT_EXPANSION, UNET, VAE_DECODER, ModelDims, leaf_specs
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
    # Fooocus V2: the expansion model's tokenizer and allowed words; None when the repository has
    # no `prompt_expansion` leaf (requests with "Fooocus V2" then get no expansion).
    expansion_tokenizer: ExpansionTokenizer | None = None
    expansion_words: list[str] | None = None
    _expander: PromptExpander | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_dir(cls, pipeline_dir: str | Path, models: ModelRunner, styles_dir: str | Path | None = None,
                 wildcards_dir: str | Path | None = None, expansion_words: str | Path | None = None) -> "Pipeline":
        """`pipeline_dir` is what the exporter writes: model_info.json and tokenizer.json. Optional
        folders of Fooocus-format style files and of wildcard files extend the built-ins. The
        expansion's allowed words: `expansion_words` (a file, one word per line), else
        `<pipeline_dir>/expansion_words.txt` when present, else the shipped list."""
        pipeline_dir = Path(pipeline_dir)
        info = json.loads((pipeline_dir / "model_info.json").read_text())
        dims = ModelDims.from_json(info["dims"])
        tokenizer, words = None, None
        if PROMPT_EXPANSION in leaf_specs(dims):
            path = pipeline_dir / "expansion_tokenizer.json"
            tokenizer = ExpansionTokenizer(path if path.exists() else pipeline_dir / "tokenizer.json")
            if tokenizer.vocab_size != dims.expansion_vocab:  # e.g. a GPT-2 vocabulary without its tokenizer
                tokenizer = None
            local = pipeline_dir / "expansion_words.txt"
            words = read_words(expansion_words or (local if local.exists() else None))
        return cls(models, ClipTokenizer(pipeline_dir / "tokenizer.json"), dims,
                   StyleLibrary.from_folder(styles_dir), WildcardLibrary.from_dir(wildcards_dir),
                   tokenizer, words)

    @property
    def expander(self) -> PromptExpander | None:
        """Fooocus V2 over the `prompt_expansion` leaf, or None when this repository has none."""
        if self._expander is None and self.expansion_tokenizer is not None:
            self._expander = PromptExpander(lambda name, inputs: self.models(name, inputs), self.expansion_tokenizer,
                                            int(self.dims.expansion_vocab), self.expansion_words,
                                            self.dims.expansion_positions)
        return self._expander

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
        expander = self.expander if any(p.use_expansion for p in plans) else None
        if expander is not None:
            emit({"type": "progress", "progress": 1, "status": "Preparing Fooocus text ..."}, None)
            plans = [p.with_expansion(expander(p.expansion_prompt, p.expansion_seed)) if p.use_expansion else p
                     for p in plans]

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
                  "prompt_expansion": plan.prompt_expansion,
                  # "Fooocus V2" is listed only when the expansion ran (not without an expansion leaf).
                  "styles": [s for s in plan.styles if s != EXPANSION_STYLE or plan.expansion is not None]}, image)

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
