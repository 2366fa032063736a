"""Fooocus's ESRGAN upscale (modules/upscaler.py `perform_upscale`): the `upscaler` leaf run tile by
tile the way Fooocus's `tiled_scale` does (`pipeline.image_tasks.tiled_scale`, which the tiled VAE
uses too), through the `ModelRunner` protocol.

Tiles are `tile` x `tile` pixels of the input (512), started every `tile - overlap` pixels (overlap
32) along each axis, the last start pulled back to `size - overlap`; the image is sent one tile at a
time (batch 1). Each tile's output is weighted by a feather that ramps linearly over the outer
`round(overlap * scale)` pixels of all four sides, and the image is the weighted sum divided by the
summed weights. The result is clamped to [0, 1] and converted to uint8 as Fooocus's
`pytorch_to_numpy` does (255 * x truncated, like the decoder's output in generate.py).
"""
from __future__ import annotations

import numpy as np
import torch

from .image_tasks import tiled_scale
from .interfaces import UPSCALER

TILE = 512
OVERLAP = 32


def upscale_tensor(models, image: torch.Tensor, tile: int = TILE, overlap: int = OVERLAP) -> torch.Tensor:
    """[1, 3, H, W] float in [0, 1] -> [1, 3, s*H, s*W] (s: the leaf's scale, read off the first
    tile), blended from tiles and not clamped."""
    if tile <= overlap:
        raise ValueError(f"the tile ({tile}) must be larger than the overlap ({overlap})")
    return tiled_scale(lambda piece: models(UPSCALER, {"image": piece})["upscaled"], image, (tile, tile), overlap)


def upscale_image(models, image: np.ndarray, tile: int = TILE, overlap: int = OVERLAP) -> np.ndarray:
    """HxWx3 uint8 -> (4H)x(4W)x3 uint8 with the `upscaler` leaf (Real-ESRGAN x4plus)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0  # a copy: PIL arrays are read-only
    with torch.no_grad():
        y = upscale_tensor(models, x, tile, overlap).clamp(0.0, 1.0)
    return np.clip(255.0 * y[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
