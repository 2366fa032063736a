"""Samplers in k-diffusion's form: each is `sampler(denoise, x, sigmas, ...)`, where
`denoise(x, sigma) -> D` is the model's x0 prediction at noise level sigma, and
d = (x - D) / sigma is the ODE derivative dx/dsigma. `callback(i, x, denoised)` runs after each
model evaluation; it may raise to stop sampling.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None


@torch.no_grad()
def sample_euler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                 noise_sampler=None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 with s_churn = 0)."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                        noise_sampler=None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022, "DPM-Solver++", data prediction).

    With lambda = -log(sigma), h = lambda_{i+1} - lambda_i and r = h_{i-1} / h:
        x <- (sigma_{i+1}/sigma_i) e^{-eta h} x + (1 - e^{-(1+eta) h}) D_i
        x <- x + 1/2 (1 - e^{-(1+eta) h}) (1/r) (D_i - D_{i-1})      (from the second step on)
        x <- x + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z_i                (z_i from the Brownian tree)
    The last step (sigma_{i+1} = 0) returns D_i.
    """
    old_denoised = None
    h_last = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
            h_last = h
        old_denoised = denoised
    return x


class BrownianTreeNoise:
    """Noise for SDE samplers from one Brownian motion W over [sigma_min, sigma_max], seeded by the
    image seed (Fooocus uses one tree per diffusion run). For the interval (sigma, sigma') it
    returns (W(sigma') - W(sigma)) / sqrt(|sigma' - sigma|), a unit normal that is the same for
    the same seed whatever the step count, so SDE samplers converge as steps grow."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: int):
        import torchsde  # the Brownian interval implementation k-diffusion and Fooocus use

        self.tree = torchsde.BrownianTree(
            t0=float(sigma_min), w0=torch.zeros_like(x),
            t1=float(sigma_max), entropy=int(seed) % (2**63),
        )

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        lo, hi = sorted((float(sigma), float(sigma_next)))
        sign = 1.0 if float(sigma) < float(sigma_next) else -1.0
        with warnings.catch_warnings():
            # torchsde stores the interval ends in float32 and warns when a query end equals
            # sigma_max up to that rounding; the query is inside the interval, so it is harmless.
            warnings.filterwarnings("ignore", message="Should have")
            w = self.tree(lo, hi) * sign
        return w / abs(float(sigma_next) - float(sigma)) ** 0.5


SAMPLERS = {
    "euler": sample_euler,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde,  # Fooocus: the _gpu suffix only moves the tree to the GPU
}
SDE_SAMPLERS = {"dpmpp_2m_sde", "dpmpp_2m_sde_gpu"}
