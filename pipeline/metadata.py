"""The generation metadata embedded in output images, as Fooocus 2.5.5 writes it
(modules/async_worker.py `save_and_log`, modules/meta_parser.py), so that Fooocus's own
"Load metadata" and A1111/Civitai readers accept our files.

Torch-free: the frontend imports it. Usage:

    info = image_info(request_params, seed=1234, full_prompt=[...], full_negative_prompt=[...])
    text = build_parameters(info, "fooocus")  # or "a1111"

Model hashes: Fooocus records the first 10 hex digits of each model file's SHA-256. We do not hash
multi-GB checkpoints per request, and the models live behind Triton anyway, so the fooocus scheme
keeps the hash keys with an empty value (the JSON has Fooocus's shape; its reader ignores hashes)
and the a1111 scheme leaves the "Model hash" / "Refiner hash" / "Lora hashes" entries out (an
empty or made-up hash would mislead Civitai's model matching).
"""
from __future__ import annotations

import json
from pathlib import PurePath

from . import presets
from .task import GenerationTask

# Fooocus's reader and Civitai key off this string; Fooocus writes 'Fooocus v' + its version.
FOOOCUS_VERSION = "Fooocus v2.5.5"
METADATA_SCHEMES = ("fooocus", "a1111")
FOOOCUS_EXPANSION = "Fooocus V2"  # the style name that switches on prompt expansion

# AdvancedParams defaults that presets.py does not carry (Fooocus-API's AdvancedParams).
DEFAULT_ADM = (1.5, 0.8, 0.3)  # adm_scaler_positive, adm_scaler_negative, adm_scaler_end
DEFAULT_VAE = "Default (model)"
DEFAULT_REFINER_SWAP_METHOD = "joint"
DEFAULT_FREEU = (1.01, 1.02, 0.99, 0.95)  # b1, b2, s1, s2
MAX_LORAS = 5  # Fooocus's default_max_lora_number; the request's list is cut to this
DEFAULT_LORA_WEIGHT = 0.5  # Fooocus-API's Lora.weight default

# modules/flags.py KSAMPLER + SAMPLER_EXTRA labels. Samplers without a label (heunpp2,
# dpmpp_3m_sde(_gpu), ddpm, uni_pc_bh2) keep their own name and never get " Karras".
A1111_SAMPLER_LABELS = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "dpm_fast": "DPM fast",
    "dpm_adaptive": "DPM adaptive",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_sde_gpu": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "lcm": "LCM",
    "tcd": "TCD",
    "restart": "Restart",
    "ddim": "DDIM",
    "uni_pc": "UniPC",
}


def a1111_sampler_label(sampler: str, scheduler: str) -> str:
    """The A1111 'Sampler' value. Fooocus means to skip " Karras" for some samplers, but it compares
    its exclusion list against the label instead of the key, so every labelled sampler gets it."""
    label = A1111_SAMPLER_LABELS.get(sampler)
    if label is None:
        return sampler
    return f"{label} Karras" if scheduler == "karras" else label


# Building the info dict


def image_info(request: dict, *, seed: int, steps: int | None = None, width: int | None = None,
               height: int | None = None, sampler: str | None = None, scheduler: str | None = None,
               full_prompt: list[str] | None = None, full_negative_prompt: list[str] | None = None,
               prompt_expansion: str = "", styles: list[str] | None = None,
               loras: list[tuple[str, float]] | None = None) -> dict:
    """The metadata of one image: the request's fields (Fooocus-API names) resolved the way the
    pipeline resolves them (performance preset, overwrites, refiner rules), with whatever the
    pipeline knows better (keyword arguments) taking precedence. Defaults for the prompt lists
    are the prompt's non-empty lines, i.e. the prompt before styles and expansion."""
    task = GenerationTask.from_dict(request)
    perf = task.performance
    adv = task.adv
    size = task.size
    prompt = request.get("prompt") or ""
    negative = request.get("negative_prompt") or ""
    refiner, refiner_switch = _refiner(request, perf)
    return {
        "prompt": prompt,
        "negative_prompt": negative,
        "prompt_expansion": prompt_expansion or "",
        "styles": list(styles) if styles is not None else _styles(request),
        "performance": perf.name,
        "steps": int(steps if steps is not None else task.steps),
        "width": int(width if width is not None else size[0]),
        "height": int(height if height is not None else size[1]),
        "guidance_scale": task.cfg,
        "sharpness": float(task.sharpness if perf.sharpness is None else perf.sharpness),
        "adm_guidance": perf.adm or _adm(adv),
        "base_model": request.get("base_model_name") or presets.DEFAULT_BASE_MODEL,
        "refiner_model": refiner,
        "refiner_switch": refiner_switch,
        "overwrite_switch": float(adv("overwrite_switch", -1)),
        "refiner_swap_method": adv("refiner_swap_method", DEFAULT_REFINER_SWAP_METHOD),
        "adaptive_cfg": float(perf.adaptive_cfg if perf.adaptive_cfg is not None
                              else adv("adaptive_cfg", presets.DEFAULT_ADAPTIVE_CFG)),
        "clip_skip": task.clip_skip,
        "sampler": sampler or task.sampler,
        "scheduler": scheduler or task.scheduler,
        "vae": adv("vae_name", DEFAULT_VAE) or DEFAULT_VAE,
        "seed": int(seed),
        "freeu": _freeu(adv),
        "loras": list(loras) if loras is not None else _loras(request, perf),
        "full_prompt": list(full_prompt) if full_prompt is not None else _lines(prompt),
        "full_negative_prompt": list(full_negative_prompt) if full_negative_prompt is not None
        else _lines(negative),
    }


def _lines(text: str) -> list[str]:
    # Fooocus splits the prompt into lines, strips them and drops the empty ones.
    return [line.strip() for line in text.splitlines() if line.strip()]


def _styles(request: dict) -> list[str]:
    # Fooocus logs "Fooocus V2" first, then the other selected styles in request order.
    selected = request.get("style_selections")
    selected = list(presets.STYLE_DEFAULTS if selected is None else selected)
    rest = [s for s in selected if s != FOOOCUS_EXPANSION]
    return [FOOOCUS_EXPANSION] + rest if FOOOCUS_EXPANSION in selected else rest


def _refiner(request: dict, perf: presets.Performance) -> tuple[str, float]:
    """(refiner file name or "None", refiner switch). The restricted modes (those with their own
    LoRA) turn the refiner off and set the switch to 1.0; a refiner equal to the base is off."""
    if perf.lora is not None:
        return "None", 1.0
    refiner = request.get("refiner_model_name") or "None"
    if refiner == (request.get("base_model_name") or presets.DEFAULT_BASE_MODEL):
        refiner = "None"
    switch = request.get("refiner_switch")
    return refiner, float(presets.DEFAULT_REFINER_SWITCH if switch is None else switch)


def _adm(adv) -> tuple[float, float, float]:
    keys = ("adm_scaler_positive", "adm_scaler_negative", "adm_scaler_end")
    return tuple(float(adv(k, d)) for k, d in zip(keys, DEFAULT_ADM))


def _freeu(adv) -> tuple[float, float, float, float] | None:
    if not adv("freeu_enabled", False):
        return None
    keys = ("freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2")
    return tuple(float(adv(k, d)) for k, d in zip(keys, DEFAULT_FREEU))


def _loras(request: dict, perf: presets.Performance) -> list[tuple[str, float]]:
    """Enabled LoRAs other than "None", in request order, then the performance mode's own LoRA.
    Accepts Fooocus-API dicts ({enabled, model_name, weight}) and the stored [enabled, name, weight]
    / (name, weight) sequences."""
    raw = request.get("loras")
    entries = [_lora_entry(e) for e in (presets.DEFAULT_LORAS if raw is None else raw)][:MAX_LORAS]
    loras = [(name, weight) for enabled, name, weight in entries if enabled and name != "None"]
    if perf.lora is not None:
        loras.append((perf.lora[0], float(perf.lora[1])))
    return loras


def _lora_entry(entry) -> tuple[bool, str, float]:
    if isinstance(entry, dict):
        weight = entry.get("weight", DEFAULT_LORA_WEIGHT)
        return (bool(entry.get("enabled", True)), str(entry.get("model_name") or "None"),
                float(DEFAULT_LORA_WEIGHT if weight is None else weight))
    if len(entry) == 3:
        return bool(entry[0]), str(entry[1]), float(entry[2])
    return True, str(entry[0]), float(entry[1])


# Serialising


def _stem(name: str) -> str:
    # Fooocus records models by file stem: no folder, no extension.
    return PurePath(name).stem


def _optional_fields(info: dict) -> list[tuple[str, object]]:
    """The entries Fooocus writes only when they differ from the defaults, in its order."""
    fields: list[tuple[str, object]] = []
    if info["refiner_model"] != "None":
        if info["overwrite_switch"] > 0:
            fields.append(("overwrite_switch", info["overwrite_switch"]))
        if info["refiner_swap_method"] != DEFAULT_REFINER_SWAP_METHOD:
            fields.append(("refiner_swap_method", info["refiner_swap_method"]))
    if info["adaptive_cfg"] != presets.DEFAULT_ADAPTIVE_CFG:
        fields.append(("adaptive_cfg", info["adaptive_cfg"]))
    if info["clip_skip"] > 1:
        fields.append(("clip_skip", info["clip_skip"]))
    if info["freeu"] is not None:
        fields.append(("freeu", str(tuple(info["freeu"]))))
    return fields


def fooocus_parameters(info: dict) -> str:
    """The fooocus scheme: a JSON object with sorted keys (ASCII-escaped, as json.dumps does by
    default, which also keeps non-ASCII prompts intact in the ASCII-only EXIF field)."""
    res: dict[str, object] = {
        "prompt": info["prompt"],
        "negative_prompt": info["negative_prompt"],
        "prompt_expansion": info["prompt_expansion"],
        "styles": str(list(info["styles"])),
        "performance": info["performance"],
        "steps": info["steps"],
        "resolution": str((info["width"], info["height"])),
        "guidance_scale": info["guidance_scale"],
        "sharpness": info["sharpness"],
        "adm_guidance": str(tuple(info["adm_guidance"])),
        "base_model": _stem(info["base_model"]),
        "base_model_hash": "",
        "refiner_model": info["refiner_model"],
        "refiner_switch": info["refiner_switch"],
        "sampler": info["sampler"],
        "scheduler": info["scheduler"],
        "vae": _stem(info["vae"]),
        "seed": str(info["seed"]),
        "loras": [[_stem(name), weight, ""] for name, weight in info["loras"]],
        "full_prompt": list(info["full_prompt"]),
        "full_negative_prompt": list(info["full_negative_prompt"]),
        "metadata_scheme": "fooocus",
        "version": FOOOCUS_VERSION,
    }
    if info["refiner_model"] != "None":
        res["refiner_model"] = _stem(info["refiner_model"])
        res["refiner_model_hash"] = ""
    res.update(_optional_fields(info))
    for i, (name, weight) in enumerate(info["loras"], start=1):
        res[f"lora_combined_{i}"] = f"{_stem(name)} : {weight}"
    return json.dumps(dict(sorted(res.items())))


_A1111_OPTIONAL_LABELS = {
    "adaptive_cfg": "Adaptive CFG",
    "clip_skip": "Clip skip",
    "overwrite_switch": "Overwrite Switch",
    "refiner_swap_method": "Refiner Swap Method",
    "freeu": "FreeU",
}


def a1111_quote(value) -> str:
    """Fooocus's util.quote: values with ',', ':' or a newline become JSON strings, so the
    'Key: value, Key: value' line stays parseable."""
    text = str(value)
    if any(c in text for c in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def a1111_parameters(info: dict) -> str:
    """The a1111 scheme: the full positive prompt, a 'Negative prompt:' line (left out when the
    negative prompt is empty, as Fooocus and A1111 do), then one 'Key: value, ...' line."""
    params: list[tuple[str, object]] = [
        ("Steps", info["steps"]),
        ("Sampler", a1111_sampler_label(info["sampler"], info["scheduler"])),
        ("Seed", str(info["seed"])),
        ("Size", f"{info['width']}x{info['height']}"),
        ("CFG scale", info["guidance_scale"]),
        ("Sharpness", info["sharpness"]),
        ("ADM Guidance", str(tuple(info["adm_guidance"]))),
        ("Model", _stem(info["base_model"])),
        ("Performance", info["performance"]),
        ("Scheduler", info["scheduler"]),
        ("VAE", _stem(info["vae"])),
        ("Raw prompt", info["prompt"]),
        ("Raw negative prompt", info["negative_prompt"]),
    ]
    if info["refiner_model"] != "None":
        params.append(("Refiner", _stem(info["refiner_model"])))
    params += [(_A1111_OPTIONAL_LABELS[key], value) for key, value in _optional_fields(info)]
    if info["loras"]:
        params.append(("Lora weights", ", ".join(f"{_stem(n)}: {w}" for n, w in info["loras"])))
    params.append(("Version", FOOOCUS_VERSION))

    line = ", ".join(f"{key}: {a1111_quote(value)}" for key, value in params)
    positive = ", ".join(info["full_prompt"])
    negative = ", ".join(info["full_negative_prompt"])
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{positive}{negative_line}\n{line}".strip()


def build_parameters(info: dict, scheme: str) -> str:
    """The metadata text for `scheme` ("fooocus" or "a1111"); ValueError for anything else, which
    the frontend should have refused (Fooocus-API's worker dies on it)."""
    if scheme == "fooocus":
        return fooocus_parameters(info)
    if scheme == "a1111":
        return a1111_parameters(info)
    raise ValueError(f"meta_scheme must be one of {METADATA_SCHEMES}, got {scheme!r}")
