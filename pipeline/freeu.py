"""FreeU v2 (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"; the `FreeU_V2` patch Fooocus
applies to its base UNet) as runtime inputs of the `unet` leaf.

In the UNet's output blocks, before the hidden state h and the skip tensor hsp are concatenated
for a resnet, and only where h has model_channels·4 channels (factors b1, s1) or model_channels·2
(b2, s2) — SDXL: 1280 and 640, i.e. every resnet of diffusers' up_blocks[0], up_blocks[1].resnets[0]
(whose h comes from the 1280-channel block above), up_blocks[1].resnets[1:] and
up_blocks[2].resnets[0]:

    m    = mean of h over channels, (B, 1, H, W), scaled per sample to [0, 1] by its min and max
    h[:, :C/2] *= (b − 1)·m + 1
    hsp  = fourier_filter(hsp, scale=s)

`fourier_filter` is FreeU's FFT filter with threshold 1: the 2×2 block of frequencies around the
centre of the shifted spectrum, (ky, kx) ∈ {−1, 0}², is multiplied by s. Written without a DFT (the
UNet must stay exportable to TensorRT, which has none): those four frequencies span a rank-≤2
space per axis, so

    fourier_filter(x) = x + (s − 1)·Re(P_H x P_Wᵀ),  P_N[n, m] = (1/N)·Σ_{k∈{0,−1}} e^{2πik(n−m)/N}

and with the real basis U_N = [1, cos θ, sin θ] (θ = 2πn/N, n = 0..N−1), Re(P_H x P_Wᵀ) =
U_H (Y − J Y Jᵀ) U_Wᵀ with Y = U_Hᵀ x U_W / (HW) (3×3 per channel) and J the 90° rotation of the
(cos, sin) plane. For N = 1 the two frequencies coincide (the FFT version scales it once): the
cos/sin columns are zeroed there. Cost: a few skinny matmuls per resnet.

The factors travel as the UNet input `freeu` (batch, 4) = (b1, b2, s1, s2); (1, 1, 1, 1) leaves
the UNet's output bit for bit unchanged (h·1 and x + 0·L; the min = max case is guarded so no NaN
can appear). The hook (`install_freeu`) is a forward pre-hook on the affected resnets, so every
parameter keeps its name (checkpoint keys, LoRA keys, ONNX initializer names).
"""
from __future__ import annotations

import math

import torch

from .metadata import DEFAULT_FREEU

FREEU_IDENTITY = (1.0, 1.0, 1.0, 1.0)  # b1, b2, s1, s2 that change nothing (FreeU off)


def freeu_factors(task) -> torch.Tensor:
    """The `freeu` UNet input of one sample, (1, 4) float32 = (b1, b2, s1, s2): the request's
    factors when `freeu_enabled`, else the identity. `task` None gives the identity too (Fooocus
    applies FreeU to the base model only: pass None for a refiner's steps). Repeat it to the UNet
    batch."""
    if task is None or not task.adv("freeu_enabled", False):
        return torch.tensor([FREEU_IDENTITY], dtype=torch.float32)
    keys = ("freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2")
    return torch.tensor([[float(task.adv(k, d)) for k, d in zip(keys, DEFAULT_FREEU)]], dtype=torch.float32)


# --- the math ------------------------------------------------------------------------------------

# J: (cos, sin) -> (sin, −cos); Re(e^{-iθn} e^{iθm}) pairs cos·cos + sin·sin, the imaginary parts
# pair through J (see the module docstring).
_ROTATION = ((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0))


def _basis(n: int, like: torch.Tensor) -> torch.Tensor:
    """(n, 3): [1, cos 2πk/n, sin 2πk/n] for k = 0..n−1; the cos/sin columns are zero for n = 1,
    where frequency −1 is frequency 0."""
    index = torch.arange(n, device=like.device)  # int64: TensorRT's Range takes a runtime float limit badly
    theta = index.to(like.dtype) * (2.0 * math.pi / n)
    distinct = (index[-1:] > 0).to(like.dtype)  # 1 unless n == 1
    return torch.stack([torch.ones_like(theta), torch.cos(theta) * distinct, torch.sin(theta) * distinct], dim=1)


def low_frequencies(x: torch.Tensor) -> torch.Tensor:
    """Re(IDFT(DFT(x) restricted to (ky, kx) ∈ {−1, 0}²)) over the last two axes, without a DFT."""
    h, w = x.shape[-2], x.shape[-1]
    uh, uw = _basis(h, x), _basis(w, x)
    y = (uh.transpose(0, 1) / h) @ x @ (uw / w)  # (..., 3, 3): bounded by max |x| (fp16-safe)
    j = torch.tensor(_ROTATION, device=x.device, dtype=x.dtype)
    core = y - j @ y @ j.transpose(0, 1)
    return uh @ core @ uw.transpose(0, 1)


def fourier_filter(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FreeU's Fourier filter with threshold 1: the four lowest frequencies of each (H, W) plane
    scaled by `scale` (a tensor broadcastable to x, e.g. (B, 1, 1, 1)). Computed in float32."""
    x32 = x.float()
    return (x32 + (scale.float() - 1.0) * low_frequencies(x32)).to(x.dtype)


def backbone_scale(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FreeU v2's backbone factor for h's first half of channels: (b − 1)·m + 1 with m the
    channel mean of h scaled per sample to [0, 1] (0 where the mean is constant)."""
    mean = h.float().mean(dim=1, keepdim=True)
    flat = mean.flatten(1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    m = (mean - lo[:, None, None, None]) / span[:, None, None, None]
    return (b.float() - 1.0) * m + 1.0


def freeu_v2(h: torch.Tensor, hsp: torch.Tensor, b: torch.Tensor, s: torch.Tensor):
    """(h, hsp) after FreeU v2 with per-sample factors b, s of shape (B,)."""
    b, s = b.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)
    half = h.shape[1] // 2
    scaled = (h[:, :half].float() * backbone_scale(h, b)).to(h.dtype)
    return torch.cat([scaled, h[:, half:]], dim=1), fourier_filter(hsp, s)


# --- the hook into diffusers' UNet2DConditionModel ------------------------------------------------

class FreeUState:
    """The factors of the UNet call in progress ((B, 4) tensor), or None outside a call (the
    hooks then change nothing). One per UNet module; a module serves one call at a time."""

    def __init__(self):
        self.factors: torch.Tensor | None = None


class _FreeUPreHook:
    """Forward pre-hook of one up-block resnet: its input is cat([h, hsp]) with h of
    `h_channels` channels; applies FreeU v2 with factor column `stage` (0: b1/s1, 1: b2/s2)."""

    def __init__(self, state: FreeUState, h_channels: int, stage: int):
        self.state, self.h_channels, self.stage = state, h_channels, stage

    def __call__(self, module, args):
        factors = self.state.factors
        if factors is None:
            return None
        x, *rest = args
        f = factors.to(x.device)
        h, hsp = freeu_v2(x[:, :self.h_channels], x[:, self.h_channels:], f[:, self.stage], f[:, 2 + self.stage])
        return (torch.cat([h, hsp], dim=1), *rest)


def up_block_h_channels(config) -> list[list[int]]:
    """Channels of h entering each resnet of each up block of a diffusers UNet2DConditionModel
    (before the skip tensor is appended): the previous block's width for a block's first resnet,
    the block's own width after."""
    widths = list(reversed(config.block_out_channels))
    layers = config.layers_per_block
    layers = list(reversed(layers)) if isinstance(layers, (list, tuple)) else [layers] * len(widths)
    out = []
    for i, width in enumerate(widths):
        previous = widths[max(i - 1, 0)]
        out.append([previous if j == 0 else width for j in range(layers[i] + 1)])
    return out


def install_freeu(unet) -> FreeUState:
    """Hooks FreeU v2 into a diffusers UNet2DConditionModel (once; later calls return the same
    state). Set `state.factors` to a (B, 4) tensor around a call; None disables the hooks."""
    state = getattr(unet, "_freeu_state", None)
    if state is not None:
        return state
    state = FreeUState()
    model_channels = unet.config.block_out_channels[0]
    stages = {model_channels * 4: 0, model_channels * 2: 1}
    for block, channels in zip(unet.up_blocks, up_block_h_channels(unet.config)):
        assert len(block.resnets) == len(channels), "unexpected up-block layout"
        for resnet, c in zip(block.resnets, channels):
            if c in stages:
                assert resnet.in_channels > c, "an up-block resnet without a skip input"
                resnet.register_forward_pre_hook(_FreeUPreHook(state, c, stages[c]))
    unet._freeu_state = state
    return state
