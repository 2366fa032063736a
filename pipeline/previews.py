"""Cheap step previews: the current x0 prediction's latent projected linearly to RGB (SDXL's
published latent-to-RGB factors), upsampled 2x to a quarter of the output size like Fooocus's
preview, as a raw base64 PNG (what query-job's `job_step_preview` carries)."""
from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

# SDXL latent channels -> RGB, and the bias, in [-1, 1] units.
SDXL_LATENT_RGB = torch.tensor([[0.3651, 0.4232, 0.4341],
                                [-0.2533, -0.0042, 0.1068],
                                [0.1076, 0.1111, -0.0362],
                                [-0.3165, -0.2492, -0.2188]])
SDXL_LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])


def preview_rgb(denoised: torch.Tensor) -> np.ndarray:
    """[1, 4, h, w] x0 latent -> [2h, 2w, 3] uint8."""
    rgb = torch.einsum("chw,cr->hwr", denoised[0, :4].float(), SDXL_LATENT_RGB) + SDXL_LATENT_RGB_BIAS
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return rgb.repeat(2, axis=0).repeat(2, axis=1)


def preview_png_b64(denoised: torch.Tensor) -> str:
    buf = io.BytesIO()
    Image.fromarray(preview_rgb(denoised)).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()
