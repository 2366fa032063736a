"""Noise schedules in k-diffusion's sigma space over SDXL's discrete training schedule.

SDXL was trained on 1000 timesteps with a "scaled linear" beta schedule:
    beta_i = linspace(sqrt(0.00085), sqrt(0.012), 1000)_i ** 2,  alphā = cumprod(1 - beta),
    sigma_i = sqrt((1 - alphā_i) / alphā_i)
so sigma_min = sigma_0 ≈ 0.0291672 and sigma_max = sigma_999 ≈ 14.614642. Every schedule
returns n sigmas, high to low, plus a final 0.
"""
from __future__ import annotations

import math

import torch

from .errors import UnsupportedFeature

NUM_TRAIN_TIMESTEPS = 1000


class DiscreteSchedule:
    """SDXL's sigma table with the timestep <-> sigma maps of an epsilon-prediction model."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The integer timestep whose log-sigma is nearest (the UNet only sees integers)."""
        dists = sigma.float().log().reshape(-1, 1) - self.log_sigmas.reshape(1, -1)
        return dists.abs().argmin(dim=1).reshape(sigma.shape).float()

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a (fractional) timestep: log-sigma interpolated between integer indices."""
        t = timestep.double().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = (t - low).float()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


SDXL_SCHEDULE = DiscreteSchedule()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1).float()])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (EDM), eq. 5: sigma_k = (smax^(1/rho) + k/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n sigmas log-linear from sigma_max down to sigma_min."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def normal_sigmas(n: int, schedule: DiscreteSchedule = SDXL_SCHEDULE) -> torch.Tensor:
    """n timesteps evenly spaced from 999 to 0, mapped to sigma."""
    return _append_zero(schedule.sigma(torch.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, n)))


def sgm_uniform_sigmas(n: int, schedule: DiscreteSchedule = SDXL_SCHEDULE) -> torch.Tensor:
    """linspace(999, 0, n + 1) without its last point (the SGM/Lightning spacing)."""
    return _append_zero(schedule.sigma(torch.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, n + 1)[:-1]))


SCHEDULERS = {
    "karras": lambda n, s: karras_sigmas(n, s.sigma_min, s.sigma_max),
    "exponential": lambda n, s: exponential_sigmas(n, s.sigma_min, s.sigma_max),
    "normal": normal_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
}


def calculate_sigmas(scheduler: str, steps: int, denoise: float = 1.0,
                     schedule: DiscreteSchedule = SDXL_SCHEDULE) -> torch.Tensor:
    """steps + 1 sigmas. A partial denoise d < 1 takes the tail of an int(steps/d)-step schedule."""
    if scheduler not in SCHEDULERS:
        raise UnsupportedFeature(f"scheduler '{scheduler}' is not supported by this server yet")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    return SCHEDULERS[scheduler](total, schedule)[-(steps + 1):]
