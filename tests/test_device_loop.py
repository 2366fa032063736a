"""The step loop keeps its state on the pipeline's device and never reads it back to the host.

The BLS on a GPU runs the core with `Pipeline.device = cuda:N`: latents, conditioning and noise
must live there, and nothing inside the sampling loop may copy a device tensor to the host (a
hidden synchronisation per step). No GPU is needed to check this: PyTorch's `meta` device has
CUDA's placement rules (an op mixing a meta tensor with a CPU tensor that is not a 0-dim scalar
raises) and no data at all (`float()`, `.item()`, `.numpy()` or a data-dependent branch on a meta
tensor raises). The leaf models are replaced by a runner that answers with tensors of the right
shape on the device of their inputs, except the VAE decoder, whose output is where the
pipeline leaves the device; it records where every UNet input was.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.interfaces import PROMPT_EXPANSION, TEXT_ENCODER_G, TEXT_ENCODER_L, UNET, UPSCALER, VAE_DECODER, VAE_ENCODER, leaf_specs

META = torch.device("meta")
# The UNet's per-call host scalar: the timestep (from the host sigma schedule) is sent as is.
HOST_INPUTS = {"timestep"}


class ShapeRunner:
    """Leaf outputs with the interface's shapes on the input's device (zeros on the host)."""

    def __init__(self, dims):
        self.dims = dims
        self.unet_inputs: list[dict[str, torch.device]] = []

    def __call__(self, model, inputs, patches=()):
        d = self.dims
        if model.startswith(UNET):
            self.unet_inputs.append({k: v.device for k, v in inputs.items()})
            return {"noise_pred": torch.zeros_like(inputs["sample"])}
        if model in (TEXT_ENCODER_L, TEXT_ENCODER_G, PROMPT_EXPANSION):
            ids = inputs["input_ids"]
            spec = leaf_specs(d)[model]
            out = {}
            for t in spec.outputs:
                named = {"batch": ids.shape[0], "sequence": ids.shape[-1]}
                shape = [named.get(s, s) for s in t.shape]
                out[t.name] = torch.zeros(shape, device=ids.device)
            return out
        if model == VAE_ENCODER:
            image = inputs["image"]
            b, _, h, w = image.shape
            f = d.vae_scale_factor
            return {"latent": torch.zeros(b, d.latent_channels, h // f, w // f, device=image.device)}
        if model == VAE_DECODER:
            latent = inputs["latent"]
            b, _, h, w = latent.shape
            f = d.vae_scale_factor
            return {"image": torch.zeros(b, 3, h * f, w * f)}  # the result comes back to the host
        if model == UPSCALER:
            image = inputs["image"]
            b, c, h, w = image.shape
            k = d.upscaler_scale
            return {"upscaled": torch.zeros(b, c, h * k, w * k, device=image.device)}
        raise AssertionError(f"unexpected leaf {model}")


@pytest.fixture()
def meta_pipeline(model_repository):
    from pipeline.generate import Pipeline

    pipeline = Pipeline.from_dir(model_repository / "fooocus_pipeline" / "1", models=None, device="meta")
    pipeline.models = ShapeRunner(pipeline.dims)
    return pipeline


def _png(size=(64, 64), value=128):
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mask(size=(64, 64)):
    mask = np.zeros(size, np.uint8)
    mask[16:48, 16:48] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


CASES = {
    # Fooocus's default sampler (Brownian-tree SDE noise), sharpness and adaptive CFG active.
    "sde_sharpness": {"guidance_scale": 9.0, "sharpness": 8.0,
                      "advanced_params": {"sampler_name": "dpmpp_2m_sde_gpu", "adaptive_cfg": 5.0}},
    "ancestral_freeu": {"advanced_params": {"sampler_name": "euler_ancestral", "freeu_enabled": True}},
    "lcm": {"guidance_scale": 1.0, "advanced_params": {"sampler_name": "lcm", "scheduler_name": "lcm"}},
    "heun_karras": {"advanced_params": {"sampler_name": "heun", "scheduler_name": "karras"}},
    "uni_pc": {"advanced_params": {"sampler_name": "uni_pc"}},
    "vary": {"uov_method": "Vary (Subtle)", "uov_input_image": _png()},
    "inpaint": {"inpaint_input_image": _png(), "inpaint_mask_image": _mask(),
                "advanced_params": {"inpaint_engine": "None"}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_loop_stays_on_the_device(meta_pipeline, case):
    from pipeline.task import GenerationTask

    request = {"prompt": "a lighthouse", "negative_prompt": "fog", "aspect_ratios_selection": "128*64",
               "image_seed": 7, **CASES[case]}
    request["advanced_params"] = {"overwrite_step": 4, "disable_preview": True,
                                  **request.get("advanced_params", {})}
    results = []
    meta_pipeline.run(GenerationTask.from_dict(request),
                      lambda event, image: results.append((event, image)) if image is not None else None)
    (event, image), = results
    assert event["type"] == "result" and image.dtype == np.uint8 and image.ndim == 3
    runner = meta_pipeline.models
    assert len(runner.unet_inputs) >= 4
    for call in runner.unet_inputs:
        misplaced = {k: str(v) for k, v in call.items() if k not in HOST_INPUTS and v != META}
        assert not misplaced, f"UNet inputs left on the host: {misplaced}"


def test_vae_swap_refiner_stays_on_the_device(meta_pipeline):
    """The vae swap draws fresh noise and uses the base's last prediction: both on the device."""
    from pipeline.task import GenerationTask

    meta_pipeline.refiners = {"refiner.safetensors": "unet__refiner"}
    request = {"prompt": "a harbour", "aspect_ratios_selection": "64*64", "image_seed": 3,
               "refiner_model_name": "refiner.safetensors", "refiner_switch": 0.5,
               "advanced_params": {"overwrite_step": 4, "disable_preview": True, "refiner_swap_method": "vae"}}
    images = []
    meta_pipeline.run(GenerationTask.from_dict(request),
                      lambda event, image: images.append(image) if image is not None else None)
    assert len(images) == 1
    runner = meta_pipeline.models
    assert {c["sample"] for c in runner.unet_inputs} == {META}

