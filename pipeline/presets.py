"""Fooocus's defaults and performance presets: the one place the frontend (OpenAPI defaults)
and the generation core read them from. Values are Fooocus 2.5's `default` preset."""
from __future__ import annotations

from dataclasses import dataclass

SAMPLER_NAMES = (
    "euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
    "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "tcd", "restart", "ddim",
    "uni_pc", "uni_pc_bh2",
)
SCHEDULER_NAMES = (
    "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "lcm", "turbo",
    "align_your_steps", "tcd", "edm_playground_v2.5",
)
ASPECT_RATIOS = (
    "704*1408", "704*1344", "768*1344", "768*1280", "832*1216", "832*1152", "896*1152", "896*1088",
    "960*1088", "960*1024", "1024*1024", "1024*960", "1088*960", "1088*896", "1152*896", "1152*832",
    "1216*832", "1280*768", "1344*768", "1344*704", "1408*704", "1472*704", "1536*640", "1600*640",
    "1664*576", "1728*576",
)
STYLE_DEFAULTS = ("Fooocus V2", "Fooocus Enhance", "Fooocus Sharp")

DEFAULT_BASE_MODEL = "juggernautXL_v8Rundiffusion.safetensors"
DEFAULT_PERFORMANCE = "Speed"
DEFAULT_ASPECT_RATIO = "1152*896"
DEFAULT_SAMPLER = "dpmpp_2m_sde_gpu"
DEFAULT_SCHEDULER = "karras"
DEFAULT_GUIDANCE_SCALE = 4.0
DEFAULT_SHARPNESS = 2.0
DEFAULT_REFINER_SWITCH = 0.5
DEFAULT_ADAPTIVE_CFG = 7.0
DEFAULT_CLIP_SKIP = 2
DEFAULT_LORAS = (("sd_xl_offset_example-lora_1.0.safetensors", 0.1),) + (("None", 1.0),) * 4
MAX_LORAS = 5  # Fooocus's default_max_lora_number
DEFAULT_LORA_WEIGHT = 0.5  # Fooocus-API's Lora.weight default
MAX_IMAGE_NUMBER = 32
SEED_MODULUS = 2**63  # image i uses (seed + i) mod 2**63; random seeds are drawn from [0, 2**63-1]


@dataclass(frozen=True)
class Performance:
    name: str
    steps: int
    steps_uov: int  # steps for Upscale 1.5x / 2x
    # Restricted modes force these; None keeps the request's value.
    sampler: str | None = None
    scheduler: str | None = None
    guidance_scale: float | None = None
    sharpness: float | None = None
    adaptive_cfg: float | None = None
    adm: tuple[float, float, float] | None = None
    lora: tuple[str, float] | None = None


PERFORMANCES = {
    p.name: p
    for p in (
        Performance("Quality", 60, 36),
        Performance("Speed", 30, 18),
        Performance("Extreme Speed", 8, 8, "lcm", "lcm", 1.0, 0.0, 1.0, (1.0, 1.0, 0.0),
                    ("sdxl_lcm_lora.safetensors", 1.0)),
        Performance("Lightning", 4, 4, "euler", "sgm_uniform", 1.0, 0.0, 1.0, (1.0, 1.0, 0.0),
                    ("sdxl_lightning_4step_lora.safetensors", 1.0)),
        Performance("Hyper-SD", 4, 4, "dpmpp_sde_gpu", "karras", 1.0, 0.0, 1.0, (1.0, 1.0, 0.0),
                    ("sdxl_hyper_sd_4step_lora.safetensors", 0.8)),
    )
}
PERFORMANCE_NAMES = tuple(PERFORMANCES)


# Fooocus's presets (presets/*.json): request defaults that differ from the default preset.
# Applied by the frontend to fields the client did not send.
PRESETS: dict[str, dict] = {
    "default": {},
    "anime": {"base_model_name": "animaPencilXL_v500.safetensors", "guidance_scale": 6.0,
              "style_selections": ["Fooocus V2", "Fooocus Semi Realistic", "Fooocus Masterpiece"],
              "aspect_ratios_selection": "896*1152"},
    "realistic": {"base_model_name": "realisticStockPhoto_v20.safetensors", "guidance_scale": 3.0,
                  "style_selections": ["Fooocus V2", "Fooocus Photograph", "Fooocus Negative"],
                  "aspect_ratios_selection": "896*1152",
                  "loras": [{"enabled": True, "model_name": "SDXL_FILM_PHOTOGRAPHY_STYLE_V1.safetensors",
                             "weight": 0.25}],
                  "negative_prompt": "unrealistic, saturated, high contrast, big nose, painting, drawing, "
                                     "sketch, cartoon, anime, manga, render, CG, 3d, watermark, signature, label"},
    "sai": {"base_model_name": "sd_xl_base_1.0_0.9vae.safetensors",
            "refiner_model_name": "sd_xl_refiner_1.0_0.9vae.safetensors", "refiner_switch": 0.75,
            "loras": [{"enabled": True, "model_name": "sd_xl_offset_example-lora_1.0.safetensors", "weight": 0.5}],
            "guidance_scale": 7.0, "style_selections": ["Fooocus V2", "Fooocus Cinematic"]},
    "lcm": {"performance_selection": "Extreme Speed"},
    "lightning": {"performance_selection": "Lightning"},
    "playground_v2.5": {"base_model_name": "playground-v2.5-1024px-aesthetic.fp16.safetensors",
                        "guidance_scale": 2.0, "style_selections": ["Fooocus V2"],
                        "aspect_ratios_selection": "1024*1024"},
    "pony_v6": {"base_model_name": "ponyDiffusionV6XL.safetensors", "guidance_scale": 7.0,
                "style_selections": ["Fooocus Pony"], "aspect_ratios_selection": "896*1152"},
}
