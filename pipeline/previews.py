"""Cheap step previews: the current x0 prediction's latent projected linearly to RGB (SDXL's
published latent-to-RGB factors), upsampled 2x to a quarter of the output size like Fooocus's
preview, as a raw base64 PNG (what query-job's `job_step_preview` carries).

On a GPU the projection runs on the device and its few kilobytes are copied to pinned host memory
asynchronously (`StepPreviews`): a step's event carries the newest preview whose copy has finished,
so the step loop never waits for the device to render one."""
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


def _latent_rgb(denoised: torch.Tensor) -> torch.Tensor:
    """[1, 4, h, w] x0 latent -> [h, w, 3] uint8, on the latent's device."""
    d = denoised.device
    rgb = (torch.einsum("chw,cr->hwr", denoised[0, :4].float(), SDXL_LATENT_RGB.to(d))
           + SDXL_LATENT_RGB_BIAS.to(d))
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def preview_rgb(denoised: torch.Tensor) -> np.ndarray:
    """[1, 4, h, w] x0 latent -> [2h, 2w, 3] uint8."""
    return _upsampled(_latent_rgb(denoised).cpu().numpy())


def _upsampled(rgb: np.ndarray) -> np.ndarray:
    return rgb.repeat(2, axis=0).repeat(2, axis=1)


def _png_b64(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def preview_png_b64(denoised: torch.Tensor) -> str:
    return _png_b64(preview_rgb(denoised))


class StepPreviews:
    """One diffusion run's step previews. `latest(denoised)` returns the base64 PNG to send with
    this step: on the CPU this step's own; on a CUDA device the newest one whose asynchronous copy
    to the host has completed (usually the previous step's; None until the first has), never
    waiting for the device."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._pending: list = []  # (pinned host tensor, CUDA event), oldest first

    def latest(self, denoised: torch.Tensor) -> str | None:
        if denoised.device.type != "cuda":
            return preview_png_b64(denoised)
        rgb = _latent_rgb(denoised)
        host = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(rgb, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((host, event))
        ready = None
        while self._pending and self._pending[0][1].query():
            ready = self._pending.pop(0)[0]
        return _png_b64(_upsampled(ready.numpy())) if ready is not None else None
