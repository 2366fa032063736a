"""Text to image, Fooocus's way: one full diffusion run per image (batch 1, CFG folded into a
batch of 2), seeds s, s+1, ..., a progress event per step and the decoded image at the end."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .expansion import ExpansionTokenizer, PromptExpander, load_expansion_tokenizer, read_words
from .freeu import freeu_factors
from .image_tasks import (DECODE_OVERLAP, DECODE_TILINGS, ENCODE_OVERLAP, ENCODE_TILINGS, OUTPAINT_SIDES,
                          UOV_METHODS, UPSCALE_METHODS, VARY_STRENGTHS, binary_mask, center_crop_multiple,
                          decode_b64_image, decode_b64_mask, erode_or_dilate, inpaint_region, lanczos, latent_mask,
                          masked_grey, outpaint, tiled_scale, to_model_image, upscale_plan, upscale_strength,
                          vary_image, vary_strength)
from .interfaces import PROMPT_EXPANSION, UNET, UPSCALER, VAE_DECODER, VAE_ENCODER, ModelDims, leaf_specs
from .lora import FOOOCUS_PATCH, INPAINT_HEAD, MissingModelFile, Patch, TaskLoras, for_leaf, resolve_loras_dir, task_loras
from .models import ModelRunner, with_patches
from .errors import UnsupportedFeature
from .guidance import adm_emphasized, adm_time_ids, guided_denoised
from .previews import StepPreviews
from .prompts import WildcardLibrary, process_prompts
from .samplers import ANCESTRAL_SAMPLERS, SAMPLERS, SCHEDULE_SAMPLERS, SDE_SAMPLERS, BrownianTreeNoise, to_device
from .schedules import DiscreteSchedule, calculate_sigmas, lcm_denoised, model_sampling_for
from .styles import EXPANSION_STYLE, StyleLibrary
from .task import GenerationTask
from .text import ClipTokenizer, PromptEncoder, match_lengths

# Fooocus's progress bar: 0-15 % preparation, 15-100 % sampling steps across all images.
PROGRESS_SAMPLING_START = 15
# Targets whose patchable leaves are Triton's own backends: the weights are fixed at load
# (`tensorrt` serves them by refit: pipeline.trt_runtime).
STATIC_WEIGHT_TARGETS = ("onnxruntime",)

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
    # The repository's leaf target (model_info.json) and the LoRA folder (`loras_dir` parameter;
    # see pipeline.lora.resolve_loras_dir).
    target: str = "python-ort"
    loras_dir: str | Path | None = None
    # The base checkpoint's file name, the refiners this repository serves ({file name: UNet leaf},
    # model_info.json) and the folder of Fooocus's inpaint engine files (`inpaint_dir` parameter).
    checkpoint_name: str = ""
    refiners: dict = field(default_factory=dict)
    inpaint_dir: str | Path | None = None
    # Where the step loop's tensors live (the BLS on a GPU: "cuda:N"; see `run`). Leaf calls
    # return their outputs on the device of their inputs (pipeline.models).
    device: torch.device | str = "cpu"
    _expander: PromptExpander | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_dir(cls, pipeline_dir: str | Path, models: ModelRunner, styles_dir: str | Path | None = None,
                 wildcards_dir: str | Path | None = None, expansion_words: str | Path | None = None,
                 loras_dir: str | Path | None = None, inpaint_dir: str | Path | None = None,
                 device: torch.device | str = "cpu") -> "Pipeline":
        """`pipeline_dir` is what the exporter writes: model_info.json and tokenizer.json. Optional
        folders of Fooocus-format style files and of wildcard files extend the built-ins. The
        expansion's allowed words: `expansion_words` (a file, one word per line), else
        `<pipeline_dir>/expansion_words.txt` when present, else the shipped list."""
        pipeline_dir = Path(pipeline_dir)
        info = json.loads((pipeline_dir / "model_info.json").read_text())
        dims = ModelDims.from_json(info["dims"])
        tokenizer, words = None, None
        if PROMPT_EXPANSION in leaf_specs(dims):
            tokenizer = load_expansion_tokenizer(pipeline_dir, int(dims.expansion_vocab))  # None (warned): off
            local = pipeline_dir / "expansion_words.txt"
            words = read_words(expansion_words or (local if local.exists() else None))
        return cls(models, ClipTokenizer(pipeline_dir / "tokenizer.json"), dims,
                   StyleLibrary.from_folder(styles_dir), WildcardLibrary.from_dir(wildcards_dir),
                   tokenizer, words, info.get("target", "python-ort"), loras_dir, info.get("checkpoint", ""),
                   dict(info.get("refiners", {})), inpaint_dir, torch.device(device))

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
        with the HxWx3 uint8 image. Raises Cancelled, UnsupportedFeature or ValueError.

        The sampling state (latents, conditioning, noise) lives on `self.device`; noise is drawn
        on the CPU (seeded generators, the same numbers on every device) and moved; sigmas and
        timesteps stay host scalars, so the step loop reads nothing back from the device (step
        previews are copied asynchronously: pipeline.previews.StepPreviews)."""
        task.validate(int(self.dims.extra.get("size_multiple", self.dims.vae_scale_factor)))
        sampler = SAMPLERS.get(task.sampler)
        if sampler is None:
            raise UnsupportedFeature(f"sampler '{task.sampler}' is not supported by this server yet")
        schedule, parameterisation = model_sampling_for(task.scheduler)
        if parameterisation == "edm":
            raise UnsupportedFeature("the edm_playground_v2.5 scheduler needs a Playground v2.5 checkpoint "
                                     "(EDM model and latent format), which this server does not serve")
        emit({"type": "progress", "progress": 1, "status": "Initializing ..."}, None)
        canvas = self.prepare_canvas(task, emit)
        if canvas.direct is not None:  # Upscale (Fast 2x) and very large upscales: no diffusion
            height, width = canvas.direct.shape[:2]
            emit({"type": "result", "image_index": 0, "seed": str(task.image_seeds()[0]), "width": width,
                  "height": height, "steps": 0, "sampler": task.sampler, "scheduler": task.scheduler,
                  "full_prompt": [], "full_negative_prompt": [], "prompt_expansion": "", "styles": [],
                  "goal": canvas.goal}, canvas.direct)
            return
        width, height = canvas.width, canvas.height
        seeds = task.image_seeds()
        sigmas = calculate_sigmas(task.scheduler, canvas.steps, canvas.denoise, schedule=schedule,
                                  sampler=task.sampler)
        steps = len(sigmas) - 1  # ddim_uniform and turbo may differ from the requested count
        total_steps = steps * len(seeds)
        previews = not task.adv("disable_preview", False)
        device = torch.device(self.device)

        fields = {**task.extra, "prompt": canvas.prompt if canvas.prompt is not None else task.prompt,
                  "negative_prompt": task.negative_prompt, "advanced_params": task.advanced_params}
        loras = self.task_loras(task, fields["prompt"])
        phases, switch, swap_method = self.unet_phases(task, canvas, loras.patches, steps)
        # caches texts for this task; the text encoders get the LoRAs' te1/te2 parts
        encoder = PromptEncoder(self.tokenizer, with_patches(self.models, loras.patches), task.clip_skip)
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
                                     width, height, canvas.inpaint_latent, phases=phases,
                                     record_eps=swap_method == "vae" and len(phases) > 1)
            state = denoise.state
            latent_shape = (1, self.dims.latent_channels, height // self.dims.vae_scale_factor,
                            width // self.dims.vae_scale_factor)
            # One generator per image: the initial noise, then (ancestral samplers) each step's noise.
            generator = torch.Generator().manual_seed(seed)
            noise = to_device(torch.randn(latent_shape, generator=generator, dtype=torch.float32), device)
            x = noise * initial_noise_scale(sigmas, schedule)
            if canvas.latent is not None:
                x = x + canvas.latent.to(device)
            if canvas.inpaint is not None:
                denoise = canvas.inpaint.wrap(denoise, seed)
            kwargs = {}
            if task.sampler in SDE_SAMPLERS:
                positive = sigmas[sigmas > 0]
                kwargs["noise_sampler"] = BrownianTreeNoise(x, float(positive.min()), float(positive.max()), seed)
            elif task.sampler in ANCESTRAL_SAMPLERS:
                kwargs["generator"] = generator
            if task.sampler in SCHEDULE_SAMPLERS:
                kwargs["schedule"] = schedule

            preview = StepPreviews(device) if previews else None

            def on_step(i, _x, denoised, index=index):
                if is_cancelled():
                    raise Cancelled()
                step = min(i + 1, steps)  # adaptive samplers may call back more often than planned
                done = steps * index + step
                event = {"type": "progress", "progress": PROGRESS_SAMPLING_START + (85 * done) // total_steps,
                         "status": f"Step {step}/{steps} in the {index + 1}-th Sampling",
                         "step": step, "steps": steps, "image_index": index}
                if preview is not None:
                    png = preview.latest(denoised)
                    if png is not None:
                        event["preview"] = png
                emit(event, None)

            if len(phases) == 1 or switch >= steps:
                latent = sampler(denoise, x, sigmas, callback=on_step, **kwargs)
            elif swap_method == "joint":  # one run; the refiner takes over after evaluation `switch`
                def joint_step(i, x_, denoised, index=index):
                    if i == switch:
                        state["phase"] = phases[1]
                    on_step(i, x_, denoised, index)

                latent = sampler(denoise, x, sigmas, callback=joint_step, **kwargs)
            elif swap_method == "separate":  # two runs over one sigma list, the noise continues
                latent = sampler(denoise, x, sigmas[:switch + 1], callback=on_step, **kwargs)
                state["phase"] = phases[1]
                latent = sampler(denoise, latent, sigmas[switch:],
                                 callback=lambda i, x_, d, index=index: on_step(i + switch, x_, d, index), **kwargs)
            else:  # "vae": the base denoises fully, the refiner restarts from 1.4x its sigmas
                latent = sampler(denoise, x, torch.cat([sigmas[:switch], sigmas.new_zeros(1)]),
                                 callback=on_step, **kwargs)
                state["phase"] = phases[1]
                refine = sigmas[switch:] * REFINER_VAE_SIGMA_SCALE
                fresh = to_device(torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed + 1)), device)
                if state.get("eps") is not None:  # the channel mean of the base's last prediction
                    fresh = fresh + state["eps"].mean(dim=1, keepdim=True) - fresh.mean(dim=1, keepdim=True)
                x2 = latent + fresh * refine[0]
                kwargs2 = dict(kwargs)
                if task.sampler in SDE_SAMPLERS:
                    positive = refine[refine > 0]
                    kwargs2["noise_sampler"] = BrownianTreeNoise(x2, float(positive.min()), float(positive.max()),
                                                                 seed + 1)
                elif task.sampler in ANCESTRAL_SAMPLERS:
                    kwargs2["generator"] = torch.Generator().manual_seed(seed + 1)
                latent = sampler(denoise, x2, refine,
                                 callback=lambda i, x_, d, index=index: on_step(i + switch, x_, d, index), **kwargs2)
            image = canvas.finish(self.decode(latent, tiled=canvas.tiled))
            emit({"type": "result", "image_index": index, "seed": str(seed), "width": image.shape[1],
                  "height": image.shape[0], "steps": steps, "sampler": task.sampler, "scheduler": task.scheduler,
                  "full_prompt": list(plan.full_prompt), "full_negative_prompt": list(plan.full_negative_prompt),
                  "prompt_expansion": plan.prompt_expansion, "goal": canvas.goal,
                  "loras": [[name, weight] for name, weight in loras.applied],
                  # "Fooocus V2" is listed only when the expansion ran (not without an expansion leaf).
                  "styles": [s for s in plan.styles if s != EXPANSION_STYLE or plan.expansion is not None]}, image)

    def task_loras(self, task: GenerationTask, prompt: str) -> TaskLoras:
        """The task's LoRAs (request, `<lora:…>` tags of `prompt`, performance LoRA) as files in
        the LoRA folder and a patch set. Raises MissingModelFile for a missing performance LoRA,
        UnsupportedFeature where the leaves cannot take per-request weights."""
        loras = task_loras(task.user_loras, prompt, task.performance, resolve_loras_dir(self.loras_dir))
        if loras.patches and self.target in STATIC_WEIGHT_TARGETS:
            raise UnsupportedFeature(
                f"LoRAs ({', '.join(name for name, _ in loras.applied)}) are not supported by this server's "
                f"'{self.target}' target yet: Triton's {self.target} backend cannot change weights per request "
                f"(serve a python-ort or python-torch repository for LoRAs)")
        return loras

    # --- image tasks: what sampling starts from and what happens to the decoded image --------------

    def prepare_canvas(self, task: GenerationTask, emit: Emit) -> "Canvas":
        goal = task.goal
        if goal == "upscale_vary":
            image = decode_b64_image(task.extra["uov_input_image"])
            method = task.extra.get("uov_method")
            if method in VARY_STRENGTHS:
                emit({"type": "progress", "progress": 5, "status": "Image processing ..."}, None)
                return self._encoded_canvas(goal, vary_image(image), task.steps,
                                            vary_strength(method, float(task.adv("overwrite_vary_strength", -1))),
                                            tiled=False)
            if method in UPSCALE_METHODS:
                return self._upscale_canvas(task, image, method, emit)
            raise ValueError(f"unknown uov_method {method!r}; choose from {', '.join(UOV_METHODS)}")
        if goal == "inpaint_outpaint":
            canvas = self._inpaint_canvas(task, emit)
            if canvas is not None:
                return canvas
            goal = "text_to_image"  # no mask and no outpaint direction: Fooocus ignores the image
        width, height = task.size
        return Canvas(goal, width, height, task.steps, 1.0)

    def _upscale_canvas(self, task: GenerationTask, image: np.ndarray, method: str, emit: Emit) -> "Canvas":
        emit({"type": "progress", "progress": 5, "status": "Upscaling image ..."}, None)
        plan = upscale_plan(image.shape[0], image.shape[1], method, task.extra.get("upscale_value"))
        image = lanczos(self.super_resolve(image), plan.width, plan.height)
        if plan.direct:
            return Canvas("upscale_vary", plan.width, plan.height, 0, 0.0, direct=image)
        overwrite = int(task.adv("overwrite_step", -1))
        steps = overwrite if overwrite > 0 else task.performance.steps_uov
        strength = upscale_strength(float(task.adv("overwrite_upscale_strength", -1)))
        return self._encoded_canvas("upscale_vary", image, steps, strength, tiled=True)

    def _encoded_canvas(self, goal: str, image: np.ndarray, steps: int, denoise: float, tiled: bool) -> "Canvas":
        """Diffusion from the image's latent. The image is centre-cropped to multiples of 8 (the
        output size, as Fooocus) and edge-padded to the UNet's size multiple for the models; the
        decoded image is cropped back."""
        image = center_crop_multiple(image, self.dims.vae_scale_factor)
        h, w = image.shape[:2]
        m = int(self.dims.extra.get("size_multiple", self.dims.vae_scale_factor))
        padded = np.pad(image, ((0, -h % m), (0, -w % m), (0, 0)), mode="edge")
        latent = self.encode(padded, tiled=tiled)
        return Canvas(goal, padded.shape[1], padded.shape[0], steps, denoise, latent=latent, tiled=tiled,
                      finish=lambda decoded: decoded[:h, :w])

    def _inpaint_canvas(self, task: GenerationTask, emit: Emit) -> "Canvas | None":
        x = task.extra
        image = decode_b64_image(x["inpaint_input_image"])
        size = (image.shape[1], image.shape[0])
        mask = (binary_mask(decode_b64_mask(x["inpaint_mask_image"]), size) if x.get("inpaint_mask_image")
                else np.zeros(image.shape[:2], np.uint8))
        mask = erode_or_dilate(mask, int(task.adv("inpaint_erode_or_dilate", 0)))
        if task.adv("invert_mask_checkbox", False):
            mask = 255 - mask
        selections = [s for s in x.get("outpaint_selections") or [] if s in OUTPAINT_SIDES]
        if not selections and not (mask > 127).any():
            return None
        emit({"type": "progress", "progress": 5, "status": "Image processing ..."}, None)
        strength = float(task.adv("inpaint_strength", 1.0))
        field_k = float(task.adv("inpaint_respective_field", 1.0))
        if selections:
            distances = {s: int(x.get(f"outpaint_distance_{s}") or 0) for s in ("left", "right", "top", "bottom")}
            image, mask = outpaint(image, mask, selections, distances)
            strength, field_k = 1.0, 1.0
        engine = inpaint_engine(task.adv("inpaint_engine", DEFAULT_INPAINT_ENGINE))
        region = inpaint_region(image, mask, field_k, use_fill=strength > 0.99, super_resolve=self.super_resolve)
        crop_h, crop_w = region.crop.shape[:2]
        latent_fill = self.encode(region.fill)
        latent_hw = (latent_fill.shape[2], latent_fill.shape[3])
        lmask = latent_mask(region.crop_mask, latent_hw, self.dims.vae_scale_factor)
        head_input = None
        if engine is not None:
            latent_inpaint = self.encode_float(masked_grey(region.crop, region.crop_mask))
            head_input = torch.cat([lmask, latent_inpaint], dim=1)
        initial = None if task.adv("inpaint_disable_initial_latent", False) else latent_fill
        additional = (x.get("inpaint_additional_prompt") or "").strip()
        prompt = f"{additional}\n{task.prompt}" if additional else None
        return Canvas("inpaint_outpaint", crop_w, crop_h, task.steps, strength, latent=initial,
                      finish=region.paste, inpaint=InpaintBlend(latent_fill, lmask), inpaint_latent=head_input,
                      prompt=prompt, engine=engine)

    def super_resolve(self, image: np.ndarray) -> np.ndarray:
        """The 4x ESRGAN upscaler leaf (tiled)."""
        if UPSCALER not in leaf_specs(self.dims):
            raise UnsupportedFeature("this model repository has no upscaler model (re-export it with "
                                     "`python -m export`, which adds Real-ESRGAN x4plus)")
        from .upscale import upscale_image

        return upscale_image(self.models, image)

    def encode(self, image: np.ndarray, tiled: bool = False) -> torch.Tensor:
        """HxWx3 uint8 -> the scaled latent (1, C, H/8, W/8)."""
        return self._encode(to_model_image(image), tiled)

    def encode_float(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 float in [0, 1] -> the scaled latent."""
        return self._encode(torch.from_numpy(image * 2.0 - 1.0).float().permute(2, 0, 1)[None].contiguous(), False)

    def _encode(self, pixels: torch.Tensor, tiled: bool) -> torch.Tensor:
        def run(x):
            return self.models(VAE_ENCODER, {"image": x})["latent"]

        if tiled:
            f = 1.0 / self.dims.vae_scale_factor
            latent = sum(tiled_scale(run, pixels, t, ENCODE_OVERLAP, f) for t in ENCODE_TILINGS) / len(ENCODE_TILINGS)
        else:
            latent = run(pixels)
        return latent * self.dims.vae_scaling_factor

    def unet_phases(self, task: GenerationTask, canvas: "Canvas", patches: tuple, steps: int
                    ) -> "tuple[tuple[UNetPhase, ...], int, str]":
        """(phases, switch, swap method). The base phase: the UNet with the task's LoRAs, plus the
        inpaint engine's patch and head. A second phase when a refiner is selected (its own UNet,
        the same LoRAs, no engine, no FreeU), or, for an inpaint engine without a refiner, Fooocus's
        "synthetic refiner": the base UNet without the engine from 80 % of the steps on (joint)."""
        engine = self.inpaint_engine_patches(canvas.engine) if canvas.engine else ()
        patches = for_leaf(UNET, patches)  # the UNet's part, canonical: sent as is on every call
        base = UNetPhase(UNET, for_leaf(UNET, (*patches, *engine)), inpaint_head=bool(engine))
        refiner_leaf = self.refiner_leaf(task)
        if refiner_leaf is not None:
            second, fraction, method = UNetPhase(refiner_leaf, patches, False, False), task.refiner_switch, \
                task.refiner_swap_method
        elif engine:
            second, fraction, method = UNetPhase(UNET, patches, False, False), INPAINT_SYNTHETIC_SWITCH, "joint"
        else:
            return (base,), steps, "joint"
        # Fooocus: the switch step counts the performance's (or UOV's) steps before overwrite_step.
        s = task.performance.steps_uov if canvas.goal == "upscale_vary" and canvas.tiled else task.performance.steps
        switch = int(round(s * fraction))
        overwrite = float(task.adv("overwrite_switch", -1))
        if overwrite > 0:
            switch = int(overwrite)
        return (base, second), switch, method

    def refiner_leaf(self, task: GenerationTask) -> str | None:
        """The UNet leaf of the requested refiner, or None: "None", a file this repository does not
        serve (Fooocus-API falls back to None), the base model itself, or a restricted performance."""
        name = task.refiner_model_name
        if task.performance.lora is not None or name in ("", "None", self.checkpoint_name):
            return None
        return self.refiners.get(name)

    def inpaint_engine_patches(self, engine: str) -> tuple:
        """The inpaint head and the engine's UNet patch as weight patches (files from the inpaint
        folder); MissingModelFile names what is missing."""
        folder = Path(self.inpaint_dir) if self.inpaint_dir else None
        names = (INPAINT_HEAD_FILE, INPAINT_PATCH_FILES[engine])
        missing = [n for n in names if folder is None or not (folder / n).is_file()]
        if missing:
            raise MissingModelFile(f"inpaint engine {engine} needs {' and '.join(missing)} in the inpaint folder "
                                   f"{folder} (Fooocus's files; or use inpaint_engine None)")
        return (Patch(INPAINT_HEAD, str(folder / names[0]), 1.0), Patch(FOOOCUS_PATCH, str(folder / names[1]), 1.0))

    def _denoiser(self, task: GenerationTask, schedule, parameterisation: str, cond, uncond, pooled, pooled_neg,
                  width: int, height: int, inpaint_latent: torch.Tensor | None = None,
                  phases: "tuple[UNetPhase, ...]" = (), record_eps: bool = False):
        """D(x, sigma): Fooocus's guidance around one UNet call (CFG folded into a batch of 2), on
        the UNet of the current phase (`denoise.state["phase"]`, swapped by the caller for the
        refiner) with its weight patches (pipeline.lora) merged. With `record_eps`, `state["eps"]`
        keeps the last guided prediction (the vae swap needs it)."""
        state = {"phase": phases[0] if phases else UNetPhase()}
        cfg, sharpness, adaptive = task.cfg, task.sharpness_value, task.adaptive_cfg
        adm_pos, adm_neg, adm_end = task.adm_scalers
        emph_pos, emph_neg, consistent = adm_time_ids(width, height, adm_pos, adm_neg)
        single = abs(cfg - 1.0) < 1e-4  # Fooocus evaluates only the positive prompt at CFG 1
        context = cond if single else torch.cat([cond, uncond])
        text_embeds = pooled if single else torch.cat([pooled, pooled_neg])
        batch = context.shape[0]
        f = self.dims.vae_scale_factor
        device = torch.device(self.device)
        context, text_embeds = context.to(device), text_embeds.to(device)
        emph_pos, emph_neg, consistent = emph_pos.to(device), emph_neg.to(device), consistent.to(device)
        zero_head = torch.zeros(batch, self.dims.latent_channels + 1, height // f, width // f, device=device)
        head = inpaint_latent.to(device).repeat(batch, 1, 1, 1) if inpaint_latent is not None else zero_head
        freeu = freeu_factors(task).to(device).repeat(batch, 1)  # FreeU v2 (b1, b2, s1, s2), identity when off
        no_freeu = torch.ones_like(freeu)

        def unet(inputs: dict) -> torch.Tensor:
            phase = state["phase"]
            inputs["inpaint_latent"] = head if phase.inpaint_head else zero_head
            inputs["freeu"] = freeu if phase.freeu else no_freeu
            out = (self.models(phase.model, inputs, patches=phase.patches) if phase.patches
                   else self.models(phase.model, inputs))
            return out["noise_pred"]

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            timestep = schedule.timestep(sigma.reshape(1))  # a host scalar, like sigma
            emphasized = adm_emphasized(float(timestep), adm_end)
            ids_pos = emph_pos if emphasized else consistent
            ids = ids_pos if single else torch.cat([ids_pos, emph_neg if emphasized else consistent])
            c_in = 1.0 / torch.sqrt(sigma**2 + 1.0)
            eps = unet({
                "sample": (x * c_in).repeat(batch, 1, 1, 1), "timestep": timestep.repeat(batch),
                "encoder_hidden_states": context, "text_embeds": text_embeds, "time_ids": ids,
            })
            if parameterisation == "lcm":  # LCM's consistency parameterisation (Extreme Speed)
                denoised = lcm_denoised(x, sigma, eps, timestep.reshape(()))
            else:
                denoised = x - sigma * eps
            if not single:
                denoised = guided_denoised(x, denoised[:1], denoised[1:], cfg, float(timestep), sharpness, adaptive)
            if record_eps and float(sigma) > 0:
                state["eps"] = (x - denoised) / sigma
            return denoised

        denoise.state = state
        return denoise

    def decode(self, latent: torch.Tensor, tiled: bool = False) -> np.ndarray:
        """Latent -> HxWx3 uint8 (Fooocus truncates 255 * clamp((x + 1) / 2, 0, 1))."""
        latent = latent / self.dims.vae_scaling_factor

        def run(z):
            return self.models(VAE_DECODER, {"latent": z})["image"]

        if tiled:
            image = sum(tiled_scale(run, latent, t, DECODE_OVERLAP, self.dims.vae_scale_factor)
                        for t in DECODE_TILINGS) / len(DECODE_TILINGS)
        else:
            image = run(latent)
        image = torch.clamp((image[0] + 1.0) / 2.0, 0.0, 1.0)
        return np.clip(255.0 * image.permute(1, 2, 0).cpu().numpy(), 0, 255).astype(np.uint8)


@dataclass
class Canvas:
    """Where sampling starts and what becomes of the decoded image, per goal (the same for every
    image of a task)."""

    goal: str
    width: int                # generation size (pixels)
    height: int
    steps: int
    denoise: float
    latent: torch.Tensor | None = None   # scaled initial latent (None: empty)
    tiled: bool = False                   # tiled VAE decode (upscale)
    finish: Callable[[np.ndarray], np.ndarray] = lambda image: image
    inpaint: "InpaintBlend | None" = None
    inpaint_latent: torch.Tensor | None = None  # the inpaint head's input (mask + masked latent)
    prompt: str | None = None             # replaces the request prompt (inpaint additional prompt)
    engine: str | None = None             # inpaint engine in use
    direct: np.ndarray | None = None      # the finished image when no diffusion runs


@dataclass
class InpaintBlend:
    """Fooocus's per-call inpaint blending: the known region of x is replaced by the fill latent
    re-noised to the current sigma (fresh noise from a generator seeded seed + 1), and the
    denoised output's known region by the fill latent itself."""

    fill: torch.Tensor
    mask: torch.Tensor  # (1, 1, h, w), 1 = generate

    def wrap(self, denoise, seed: int):
        energy = torch.Generator().manual_seed(seed + 1)  # on the CPU: the same noise on every device
        m, fill = self.mask, self.fill

        def blended(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            nonlocal m, fill
            if m.device != x.device:
                m, fill = m.to(x.device), fill.to(x.device)
            n = to_device(torch.randn(x.shape, generator=energy, dtype=x.dtype), x.device)
            x = x * m + (fill + sigma * n) * (1 - m)
            return denoise(x, sigma) * m + fill * (1 - m)

        return blended


@dataclass(frozen=True)
class UNetPhase:
    """Which UNet a stretch of the sampling runs on: the leaf, its weight patches, whether the
    inpaint head gets its input, whether FreeU applies (the base model only)."""

    model: str = UNET
    patches: tuple = ()  # the UNet's part of the task's patch set (pipeline.lora.for_leaf)
    inpaint_head: bool = True
    freeu: bool = True


REFINER_VAE_SIGMA_SCALE = 1.4  # the vae swap's refiner restarts from 1.4x the remaining sigmas
INPAINT_SYNTHETIC_SWITCH = 0.8
INPAINT_HEAD_FILE = "fooocus_inpaint_head.pth"
INPAINT_PATCH_FILES = {"v1": "inpaint.fooocus.patch", "v2.5": "inpaint_v25.fooocus.patch",
                       "v2.6": "inpaint_v26.fooocus.patch"}
DEFAULT_INPAINT_ENGINE = "v2.6"
INPAINT_ENGINES = ("None", "v1", "v2.5", "v2.6")


def inpaint_engine(name: str) -> str | None:
    """The engine name (an unknown one falls back to v2.6, as Fooocus-API); None for 'None'."""
    name = name if name in INPAINT_ENGINES else DEFAULT_INPAINT_ENGINE
    return None if name == "None" else name


def initial_noise_scale(sigmas: torch.Tensor, schedule: DiscreteSchedule) -> torch.Tensor:
    """Full denoise starts from variance 1 + sigma_max^2 (the model's noised-data variance);
    a partial one from sigma_0."""
    sigma0 = sigmas[0]
    if float(sigma0) >= schedule.sigma_max - 1e-5:
        return torch.sqrt(1.0 + sigma0**2)
    return sigma0
