"""Fooocus's ESRGAN upscale (modules/upscaler.py `perform_upscale`): the `upscaler` leaf run tile by
tile the way Fooocus's `tiled_scale` does, through the `ModelRunner` protocol.

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

from .interfaces import UPSCALER

TILE = 512
OVERLAP = 32


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Fooocus's tile origins along one axis of `size` pixels."""
    return [max(0, min(size - overlap, start)) for start in range(0, size, tile - overlap)]


def feather(length: int, width: int) -> torch.Tensor:
    """Weights along one axis of a tile's output: (t + 1) / width for the t-th pixel from either
    end (t < width), 1 inside; both ramps multiply where a short tile has them overlap."""
    i = torch.arange(length, dtype=torch.float32)
    return (torch.clamp((i + 1) / width, max=1.0) * torch.clamp((length - i) / width, max=1.0)
            if width > 0 else torch.ones(length))


def upscale_tensor(models, image: torch.Tensor, tile: int = TILE, overlap: int = OVERLAP) -> torch.Tensor:
    """[1, 3, H, W] float in [0, 1] -> [1, 3, s*H, s*W] (s: the leaf's scale, read off the first
    tile), blended from tiles and not clamped."""
    if tile <= overlap:
        raise ValueError(f"the tile ({tile}) must be larger than the overlap ({overlap})")
    height, width = image.shape[-2:]
    out = weight = None
    for y in tile_starts(height, tile, overlap):
        for x in tile_starts(width, tile, overlap):
            piece = image[:, :, y:y + tile, x:x + tile].contiguous()
            result = models(UPSCALER, {"image": piece})["upscaled"].float().cpu()
            if out is None:
                scale = result.shape[-1] // piece.shape[-1]
                out = torch.zeros(1, result.shape[1], height * scale, width * scale)
                weight = torch.zeros(1, 1, height * scale, width * scale)
            ramp = round(overlap * scale)
            mask = feather(result.shape[-2], ramp)[:, None] * feather(result.shape[-1], ramp)[None, :]
            rows = slice(y * scale, y * scale + result.shape[-2])
            cols = slice(x * scale, x * scale + result.shape[-1])
            out[:, :, rows, cols] += result * mask
            weight[:, :, rows, cols] += mask
    return out / weight


def upscale_image(models, image: np.ndarray, tile: int = TILE, overlap: int = OVERLAP) -> np.ndarray:
    """HxWx3 uint8 -> (4H)x(4W)x3 uint8 with the `upscaler` leaf (Real-ESRGAN x4plus)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0  # a copy: PIL arrays are read-only
    with torch.no_grad():
        y = upscale_tensor(models, x, tile, overlap).clamp(0.0, 1.0)
    return np.clip(255.0 * y[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
