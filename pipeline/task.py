"""The generation task the pipeline receives: the request's fields, by their Fooocus-API names,
with Fooocus's defaults and the performance preset resolved into concrete sampling settings."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from . import presets
from .errors import UnsupportedFeature


def resolve_seed(seed: int | str | None, rng: random.Random | None = None) -> int:
    """Fooocus: -1, any negative value or a value above 2**63-1 means a random seed in [0, 2**63-1]."""
    s = -1 if seed is None or seed == "" else int(seed)
    if s < 0 or s >= presets.SEED_MODULUS:
        s = (rng or random.SystemRandom()).randint(0, presets.SEED_MODULUS - 1)
    return s


def parse_aspect_ratio(value: str) -> tuple[int, int]:
    """'W*H' (ASCII star, width first) -> (width, height)."""
    try:
        w, h = (int(v) for v in value.replace("×", "*").split("*"))
    except ValueError:
        raise ValueError(f"aspect_ratios_selection must look like '1152*896', got {value!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"aspect_ratios_selection must be positive, got {value!r}")
    return w, h


REFINER_SWAP_METHODS = ("joint", "separate", "vae")
SUPPORTED_GOALS = ("text_to_image", "upscale_vary", "inpaint_outpaint")
GOAL_LABELS = {
    "enhance": "Image enhancement",
    "image_prompt": "Image prompt (IP-Adapter / ControlNet)",
    "upscale_vary": "Upscale or vary",
    "inpaint_outpaint": "Inpaint or outpaint",
}


@dataclass
class GenerationTask:
    prompt: str = ""
    negative_prompt: str = ""
    performance_selection: str = presets.DEFAULT_PERFORMANCE
    aspect_ratios_selection: str = presets.DEFAULT_ASPECT_RATIO
    image_number: int = 1
    image_seed: int = -1
    guidance_scale: float = presets.DEFAULT_GUIDANCE_SCALE
    sharpness: float = presets.DEFAULT_SHARPNESS
    advanced_params: dict = field(default_factory=dict)
    # Image inputs and the other request fields (raw base64 PNG images under Fooocus's internal
    # names: uov_input_image, inpaint_input_image, inpaint_mask_image, image_prompts[].cn_img,
    # enhance_input_image), kept for the image tasks.
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationTask":
        fields = set(cls.__dataclass_fields__) - {"extra"}
        known = {k: data[k] for k in fields if k in data and data[k] is not None}
        return cls(**known, extra={k: v for k, v in data.items() if k not in fields})

    @property
    def goal(self) -> str:
        """Which Fooocus tab runs, by Fooocus-API's precedence: enhance, image prompt,
        upscale/vary, inpaint/outpaint, else text to image."""
        x = self.extra
        if x.get("enhance_input_image"):
            return "enhance"
        if any(ip.get("cn_img") for ip in x.get("image_prompts") or []):
            return "image_prompt"
        if x.get("uov_input_image") and x.get("uov_method", "Disabled") != "Disabled":
            return "upscale_vary"
        if x.get("inpaint_input_image"):
            return "inpaint_outpaint"
        return "text_to_image"

    # Resolved settings (Fooocus's apply_overrides and performance restrictions).

    @property
    def performance(self) -> presets.Performance:
        return presets.PERFORMANCES[self.performance_selection]

    def adv(self, key: str, default):
        value = self.advanced_params.get(key, default)
        return default if value is None else value

    @property
    def steps(self) -> int:
        overwrite = int(self.adv("overwrite_step", -1))
        return overwrite if overwrite > 0 else self.performance.steps

    @property
    def size(self) -> tuple[int, int]:
        width, height = parse_aspect_ratio(self.aspect_ratios_selection)
        ow, oh = int(self.adv("overwrite_width", -1)), int(self.adv("overwrite_height", -1))
        return (ow if ow > 0 else width, oh if oh > 0 else height)

    @property
    def sampler(self) -> str:
        name = self.performance.sampler or self.adv("sampler_name", presets.DEFAULT_SAMPLER)
        return name if name in presets.SAMPLER_NAMES else presets.DEFAULT_SAMPLER

    @property
    def scheduler(self) -> str:
        name = self.performance.scheduler or self.adv("scheduler_name", presets.DEFAULT_SCHEDULER)
        return name if name in presets.SCHEDULER_NAMES else presets.DEFAULT_SCHEDULER

    @property
    def cfg(self) -> float:
        p = self.performance.guidance_scale
        return float(self.guidance_scale if p is None else p)

    @property
    def sharpness_value(self) -> float:
        p = self.performance.sharpness
        return float(self.sharpness if p is None else p)

    @property
    def adaptive_cfg(self) -> float:
        p = self.performance.adaptive_cfg
        return float(self.adv("adaptive_cfg", presets.DEFAULT_ADAPTIVE_CFG) if p is None else p)

    @property
    def adm_scalers(self) -> tuple[float, float, float]:
        """(positive, negative, end) of Fooocus's ADM guidance."""
        if self.performance.adm is not None:
            return self.performance.adm
        return (float(self.adv("adm_scaler_positive", 1.5)), float(self.adv("adm_scaler_negative", 0.8)),
                float(self.adv("adm_scaler_end", 0.3)))

    @property
    def refiner_model_name(self) -> str:
        return str(self.extra.get("refiner_model_name") or "None")

    @property
    def refiner_switch(self) -> float:
        value = self.extra.get("refiner_switch")
        return float(presets.DEFAULT_REFINER_SWITCH if value is None else value)

    @property
    def refiner_swap_method(self) -> str:
        """joint | separate | vae (anything else: joint, as Fooocus-API)."""
        method = self.adv("refiner_swap_method", "joint")
        return method if method in REFINER_SWAP_METHODS else "joint"

    @property
    def clip_skip(self) -> int:
        return int(self.adv("clip_skip", presets.DEFAULT_CLIP_SKIP))

    @property
    def user_loras(self) -> list[tuple[str, float]]:
        """The request's enabled LoRAs as (file name, weight), the list cut to Fooocus's 5 first;
        entries may be Fooocus-API objects {enabled, model_name, weight} or [enabled, name, weight]
        / [name, weight] lists. No `loras` field means Fooocus's defaults. Which files exist (and
        the performance LoRA) is decided where the LoRA folder is known (pipeline.lora.task_loras)."""
        raw = self.extra.get("loras")
        out = []
        for entry in (presets.DEFAULT_LORAS if raw is None else raw)[:presets.MAX_LORAS]:
            if isinstance(entry, dict):
                enabled, name, weight = entry.get("enabled", True), entry.get("model_name"), entry.get("weight")
            elif len(entry) == 3:
                enabled, name, weight = entry
            else:
                enabled, (name, weight) = True, entry
            if enabled and name and name != "None":
                out.append((str(name), float(presets.DEFAULT_LORA_WEIGHT if weight is None else weight)))
        return out

    def image_seeds(self) -> list[int]:
        seed = resolve_seed(self.image_seed)
        if self.adv("disable_seed_increment", False):
            return [seed] * self.image_number
        return [(seed + i) % presets.SEED_MODULUS for i in range(self.image_number)]

    def validate(self, size_multiple: int = 8) -> None:
        """size_multiple: the model's pixel granularity (VAE factor x UNet downsampling: 32 for SDXL)."""
        if self.performance_selection not in presets.PERFORMANCES:
            raise ValueError(f"unknown performance_selection {self.performance_selection!r}")
        goal = self.goal
        width, height = self.size
        if goal in ("text_to_image", "inpaint_outpaint") and (width % size_multiple or height % size_multiple):
            raise ValueError(f"width and height must be multiples of {size_multiple} for this model, "
                             f"got {width}*{height}")
        if goal not in SUPPORTED_GOALS:
            raise UnsupportedFeature(f"{GOAL_LABELS[goal]} is not supported by this server yet "
                                     f"(text to image, upscale/vary and inpaint/outpaint are)")
