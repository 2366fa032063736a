"""Fooocus's guidance: CFG in epsilon space with its sharpness filter and adaptive CFG, and ADM
(SDXL size-conditioning) scaling.

Notation: x the noisy latent, D the model's x0 prediction, e = x - D (= sigma * eps), t the integer
timestep fed to the UNet, p = 1 - t/999 the progress (0 at pure noise, 1 at the end).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FILTER_RADIUS = 6  # 13 x 13 neighbourhood
SIGMA_SPACE = 3.0
SIGMA_COLOR = 3.0


def progress(timestep: float) -> float:
    return 1.0 - float(timestep) / 999.0


def _spatial_kernel() -> torch.Tensor:
    k = torch.arange(-FILTER_RADIUS, FILTER_RADIUS + 1, dtype=torch.float32)
    taps = torch.exp(-(k**2) / (2 * SIGMA_SPACE**2))
    taps = taps / taps.sum()
    return torch.outer(taps, taps)


_KERNEL = _spatial_kernel()


def anisotropic_filter(e: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """Joint bilateral filter of `e` guided by `guide` ([B, C, H, W] both).

    The guide is normalised per sample over (C, H, W); each neighbour q of pixel c in the 13x13
    window weighs w_s(q - c) * exp(-0.5 * (sum_ch |g_q - g_c|)^2 / sigma_color^2), with w_s a
    separable Gaussian (sigma 3); reflect padding at the borders."""
    g = (guide - guide.mean(dim=(1, 2, 3), keepdim=True)) / (guide.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
    b, c, h, w = e.shape
    r, n = FILTER_RADIUS, (2 * FILTER_RADIUS + 1) ** 2
    # Every pixel's 13 x 13 neighbourhood as a column (one pass instead of 169 shifted passes).
    g_nb = F.unfold(F.pad(g, (r, r, r, r), mode="reflect"), 2 * r + 1).view(b, c, n, h * w)
    e_nb = F.unfold(F.pad(e, (r, r, r, r), mode="reflect"), 2 * r + 1).view(b, c, n, h * w)
    dist = (g_nb - g.reshape(b, c, 1, h * w)).abs().sum(dim=1)
    weight = _KERNEL.to(e.device, e.dtype).view(1, n, 1) * torch.exp(-0.5 * dist.square() / SIGMA_COLOR**2)
    out = (e_nb * weight.unsqueeze(1)).sum(dim=2) / weight.sum(dim=1, keepdim=True)
    return out.view(b, c, h, w)


def guided_denoised(x: torch.Tensor, d_pos: torch.Tensor, d_neg: torch.Tensor, cfg: float, timestep: float,
                    sharpness: float = 0.0, adaptive_cfg: float = 7.0) -> torch.Tensor:
    """D from the positive and negative predictions (Fooocus's patched sampling function):
        alpha = 0.001 * sharpness * p;  e_pos' = alpha * filter(e_pos; guide D_pos) + (1 - alpha) * e_pos
        e = e_neg + cfg (e_pos' - e_neg);  if cfg > adaptive_cfg (m):
        e = p * e + (1 - p) * (e_neg + m (e_pos' - e_neg))
    With sharpness 0 and cfg <= adaptive_cfg this is plain CFG."""
    p = progress(timestep)
    e_pos, e_neg = x - d_pos, x - d_neg
    alpha = 0.001 * sharpness * p
    if alpha > 0:
        e_pos = alpha * anisotropic_filter(e_pos, d_pos) + (1 - alpha) * e_pos
    e = e_neg + cfg * (e_pos - e_neg)
    if cfg > adaptive_cfg:
        e = p * e + (1 - p) * (e_neg + adaptive_cfg * (e_pos - e_neg))
    return x - e


def round64(v: int) -> int:
    return int(math.floor(v / 64.0 + 0.5)) * 64


def adm_time_ids(width: int, height: int, positive_scale: float, negative_scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDXL time ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w) for Fooocus's ADM
    guidance: the positive prompt claims an original size `positive_scale` times the target, the
    negative `negative_scale` times ("emphasized"); after adm_scaler_end both use the target size
    ("consistent"). Returns (emphasized positive, emphasized negative, consistent), each [1, 6]."""
    th, tw = round64(height), round64(width)

    def ids(oh, ow):
        return torch.tensor([[oh, ow, 0, 0, th, tw]], dtype=torch.float32)

    return (ids(int(height * positive_scale), int(width * positive_scale)),
            ids(int(height * negative_scale), int(width * negative_scale)), ids(th, tw))


def adm_emphasized(timestep: float, adm_scaler_end: float) -> bool:
    """The emphasized size conditioning applies while t > 999 (1 - adm_scaler_end)."""
    return float(timestep) > 999.0 * (1.0 - adm_scaler_end)
