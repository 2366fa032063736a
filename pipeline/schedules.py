"""Noise schedules in k-diffusion's sigma space over SDXL's discrete training schedule, and the
"model sampling" objects (timestep <-> sigma maps, parameterisations) Fooocus switches to for the
lcm / tcd / edm_playground_v2.5 schedulers.

SDXL was trained on 1000 timesteps with a "scaled linear" beta schedule:
    beta_i = linspace(sqrt(0.00085), sqrt(0.012), 1000)_i ** 2,  alphā = cumprod(1 - beta),
    sigma_i = sqrt((1 - alphā_i) / alphā_i)
so sigma_min = sigma_0 ≈ 0.0291672 and sigma_max = sigma_999 ≈ 14.614642. Every schedule
returns its sigmas, high to low, plus a final 0.

Scheduler names (Fooocus `SCHEDULER_NAMES`, reference §2.2 / §3.5) and what they compute here:

  normal            n timesteps linspace(t(sigma_max), t(sigma_min), n) -> sigma(t)
  karras            Karras et al. 2022 eq. 5, rho = 7, over [sigma_min, sigma_max]
  exponential       n sigmas log-linear from sigma_max to sigma_min
  sgm_uniform       linspace(t(sigma_max), t(sigma_min), n + 1) without its last point -> sigma(t)
  simple            table sigmas at indices -(1 + int(k * len(table) / n)), k = 0..n-1
  ddim_uniform      table sigmas at 1, 1 + s, 1 + 2s, ... (s = len(table) // n), reversed
                    (can give MORE than n steps: n = 30 -> 31)
  turbo             SD-Turbo timesteps 999, 899, ..., 99 (first n, at most 10) -> sigma(t)
  align_your_steps  AYS SDXL noise levels (Sabour et al. 2024), log-linearly resampled to n + 1
                    points when n != 10, last one set to 0
  lcm, tcd          sgm_uniform on the LCM "distilled" 50-sigma table (LCM_SCHEDULE)
  edm_playground_v2.5
                    karras over the continuous EDM range [0.002, 120] (EDM_PLAYGROUND_SCHEDULE)

DECISION (reference §3.5 QUIRK): Fooocus 2.5.5's KSampler only knows normal, karras, exponential,
sgm_uniform, simple and ddim_uniform and silently samples `turbo` and `align_your_steps` with the
`normal` schedule. This server implements them as their names promise (the turbo timesteps, the
AYS noise levels). `FOOOCUS_SAMPLES_AS_NORMAL` names the two so a bit-compatibility mode could map
them back to `normal` in one place.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import UnsupportedFeature

NUM_TRAIN_TIMESTEPS = 1000


class SigmaTable:
    """A model's sigmas, ascending; the range every schedule is drawn from."""

    sigmas: torch.Tensor

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])


class DiscreteSchedule(SigmaTable):
    """SDXL's sigma table with the timestep <-> sigma maps of an epsilon-prediction model
    (Comfy's ModelSamplingDiscrete)."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod = alphas_cumprod.float()
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    @property
    def t_max(self) -> float:
        """timestep(sigma_max): where `normal` / `sgm_uniform` start."""
        return float(self.timestep(self.sigmas[-1]))

    @property
    def t_min(self) -> float:
        """timestep(sigma_min): where `normal` / `sgm_uniform` end."""
        return float(self.timestep(self.sigmas[0]))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The integer timestep whose log-sigma is nearest (the UNet only sees integers)."""
        dists = sigma.float().log().reshape(-1, 1) - self.log_sigmas.reshape(1, -1)
        return dists.abs().argmin(dim=1).reshape(sigma.shape).float()

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a (fractional) timestep: log-sigma interpolated between integer indices."""
        return self._interp_log_sigma(timestep.double().clamp(0, len(self.sigmas) - 1))

    def _interp_log_sigma(self, idx: torch.Tensor) -> torch.Tensor:
        low = idx.floor().long()
        high = idx.ceil().long()
        w = (idx - low).float()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


class DistilledSchedule(DiscreteSchedule):
    """The LCM/TCD "discrete distilled" model sampling (Comfy's ModelSamplingDiscreteDistilled,
    Luo et al. 2023, "Latent Consistency Models"): the 1000-step table subsampled to 50 sigmas at
    original indices 19, 39, ..., 999; timestep(sigma) = 20 * (nearest table index) + 19, and
    sigma(t) interpolates log-sigma at the fractional index (t - 19) / 20.
    `alphas_cumprod` stays the full 1000-entry table (TCD indexes it by original timestep)."""

    def __init__(self, base: DiscreteSchedule, original_timesteps: int = 50):
        self.skip = NUM_TRAIN_TIMESTEPS // original_timesteps
        self.alphas_cumprod = base.alphas_cumprod
        self.sigmas = base.sigmas[self.skip - 1::self.skip].clone()
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return super().timestep(sigma) * self.skip + (self.skip - 1)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        idx = ((timestep.double() - (self.skip - 1)) / self.skip).clamp(0, len(self.sigmas) - 1)
        return self._interp_log_sigma(idx)


class EDMSchedule(SigmaTable):
    """Continuous EDM model sampling (Karras et al. 2022; Comfy's ModelSamplingContinuousEDM) as
    Fooocus sets it up for Playground v2.5: sigma in [0.002, 120], sigma_data = 0.5,
    timestep(sigma) = 0.25 ln(sigma). sigma_min/max are the ends of Comfy's float32 table
    exp(linspace(ln 0.002, ln 120, 1000))."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 120.0, sigma_data: float = 0.5):
        self.sigma_data = sigma_data
        self.sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), NUM_TRAIN_TIMESTEPS).exp()
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return 0.25 * sigma.log()

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return (timestep / 0.25).exp()


SDXL_SCHEDULE = DiscreteSchedule()
LCM_SCHEDULE = DistilledSchedule(SDXL_SCHEDULE)
EDM_PLAYGROUND_SCHEDULE = EDMSchedule(0.002, 120.0, 0.5)


# ----------------------------------------------------------------------------- parameterisations

def lcm_denoised(x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, timestep) -> torch.Tensor:
    """LCM consistency parameterisation (Luo et al. 2023, eq. 9 with Song et al. 2023's boundary
    condition; Comfy's LCM model sampling): with tau = 10 * timestep and sigma_data = 0.5,
        c_skip = sigma_data^2 / (tau^2 + sigma_data^2),  c_out = tau / sqrt(tau^2 + sigma_data^2),
        D = c_out * (x - sigma * eps) + c_skip * x
    where x is the VE (k-diffusion) input and eps the (CFG-combined) epsilon prediction.
    (diffusers' LCMScheduler applies c_skip to the VP sample x / sqrt(1 + sigma^2) instead; the
    difference, c_skip * (x_ve - x_vp), is below 1e-6 on SDXL's range because c_skip <= 7e-6.)"""
    tau = 10.0 * torch.as_tensor(timestep, dtype=torch.float64)
    c_skip = (0.25 / (tau**2 + 0.25)).to(x.dtype)
    c_out = (tau / (tau**2 + 0.25) ** 0.5).to(x.dtype)
    return c_out * (x - sigma * eps) + c_skip * x


def edm_c_in(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM input scaling (Karras et al. 2022, Table 1): c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""
    return 1.0 / (sigma**2 + sigma_data**2) ** 0.5


def edm_denoised(x: torch.Tensor, sigma: torch.Tensor, model_output: torch.Tensor,
                 sigma_data: float = 0.5) -> torch.Tensor:
    """EDM preconditioning (Karras et al. 2022, Table 1; Comfy's EDM model sampling):
    D = x * sd^2 / (sigma^2 + sd^2) + F * sigma * sd / sqrt(sigma^2 + sd^2)."""
    return (x * sigma_data**2 / (sigma**2 + sigma_data**2)
            + model_output * sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5)


# ----------------------------------------------------------------------------- schedules

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
    """n timesteps evenly spaced from timestep(sigma_max) to timestep(sigma_min) (999 -> 0 for SDXL,
    999 -> 19 on the LCM table), mapped to sigma."""
    return _append_zero(schedule.sigma(torch.linspace(schedule.t_max, schedule.t_min, n)))


def sgm_uniform_sigmas(n: int, schedule: DiscreteSchedule = SDXL_SCHEDULE) -> torch.Tensor:
    """linspace(t_max, t_min, n + 1) without its last point (the SGM/Lightning "trailing" spacing)."""
    return _append_zero(schedule.sigma(torch.linspace(schedule.t_max, schedule.t_min, n + 1)[:-1]))


def simple_sigmas(n: int, schedule: DiscreteSchedule = SDXL_SCHEDULE) -> torch.Tensor:
    """Comfy's `simple`: table sigmas at indices -(1 + int(k * (len / n))), k = 0..n-1.
    The stride is a float, exactly as Fooocus computes it, so for a few n (38, 76, 122, ...) an index
    is one below the reference's floor(k * 1000 / n) (19 * (1000 / 38) = 499.99999...)."""
    table = schedule.sigmas
    stride = len(table) / n
    return _append_zero(torch.stack([table[-(1 + int(k * stride))] for k in range(n)]))


def ddim_uniform_sigmas(n: int, schedule: DiscreteSchedule = SDXL_SCHEDULE) -> torch.Tensor:
    """DDIM's "uniform" timestep skipping (Song et al. 2021, Sec. 4.2 / Comfy's ddim_scheduler): indices
    1, 1 + s, 1 + 2s, ... < len(table) with s = max(len(table) // n, 1), high to low. Note this gives
    ceil(999 / s) steps, which can exceed n (n = 30 -> s = 33 -> 31 steps)."""
    table = schedule.sigmas
    stride = max(len(table) // n, 1)
    return _append_zero(table[torch.arange(1, len(table), stride)].flip(0))


def turbo_sigmas(n: int, schedule: DiscreteSchedule = SDXL_SCHEDULE) -> torch.Tensor:
    """SD-Turbo / ADD schedule (Sauer et al. 2023; Comfy's SDTurboScheduler at denoise 1): timesteps
    999, 899, ..., 99, the first min(n, 10) of them, mapped to sigma."""
    timesteps = torch.arange(10, 0, -1, dtype=torch.float64) * 100 - 1
    return _append_zero(schedule.sigma(timesteps[:n]))


AYS_SDXL_NOISE_LEVELS = [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945,
                         0.8620721141, 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177,
                         0.0291671582]


def loglinear_interp(levels: list[float], num: int) -> np.ndarray:
    """Resample a decreasing list to `num` points, linearly in log(sigma) over a uniform grid
    (the Align-Your-Steps recipe, Sabour et al. 2024, "Align Your Steps", Sec. 3.4)."""
    xs = np.linspace(0, 1, len(levels))
    ys = np.log(np.asarray(levels, dtype=np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, num), xs, ys))[::-1].copy()


def align_your_steps_sigmas(n: int, levels: list[float] = AYS_SDXL_NOISE_LEVELS) -> torch.Tensor:
    """Align Your Steps (Sabour et al. 2024) SDXL noise levels: the 11 published values when n = 10,
    otherwise log-linearly resampled to n + 1 points; the last point (sigma_min) is replaced by 0."""
    sigmas = np.asarray(levels, dtype=np.float64) if n + 1 == len(levels) else loglinear_interp(levels, n + 1)
    sigmas = sigmas.copy()
    sigmas[-1] = 0.0
    return torch.from_numpy(sigmas).float()


SCHEDULERS = {
    "normal": normal_sigmas,
    "karras": lambda n, s: karras_sigmas(n, s.sigma_min, s.sigma_max),
    "exponential": lambda n, s: exponential_sigmas(n, s.sigma_min, s.sigma_max),
    "sgm_uniform": sgm_uniform_sigmas,
    "simple": simple_sigmas,
    "ddim_uniform": ddim_uniform_sigmas,
    "lcm": lambda n, s: sgm_uniform_sigmas(n, LCM_SCHEDULE),
    "turbo": turbo_sigmas,
    "align_your_steps": lambda n, s: align_your_steps_sigmas(n),
    "tcd": lambda n, s: sgm_uniform_sigmas(n, LCM_SCHEDULE),
    "edm_playground_v2.5": lambda n, s: karras_sigmas(
        n, EDM_PLAYGROUND_SCHEDULE.sigma_min, EDM_PLAYGROUND_SCHEDULE.sigma_max),
}

# Fooocus 2.5.5 samples these two with `normal` (reference §3.5 QUIRK); we deliberately do not.
FOOOCUS_SAMPLES_AS_NORMAL = frozenset({"turbo", "align_your_steps"})

# Samplers for which Comfy's KSampler computes steps + 1 sigmas and drops the penultimate one
# (ldm_patched/modules/samplers.py `KSampler.calculate_sigmas`). Fooocus 2.5.5's source lists
# uni_pc and uni_pc_bh2 there too, next to dpm_2 / dpm_2_ancestral (the reference's §2.1 names
# only the latter two); we follow the source.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def model_sampling_for(scheduler: str):
    """(schedule, parameterisation) the model must use for this scheduler, as Fooocus patches it:
    lcm -> (LCM_SCHEDULE, "lcm"), tcd -> (LCM_SCHEDULE, "eps"),
    edm_playground_v2.5 -> (EDM_PLAYGROUND_SCHEDULE, "edm"), anything else -> (SDXL_SCHEDULE, "eps")."""
    if scheduler == "lcm":
        return LCM_SCHEDULE, "lcm"
    if scheduler == "tcd":
        return LCM_SCHEDULE, "eps"
    if scheduler == "edm_playground_v2.5":
        return EDM_PLAYGROUND_SCHEDULE, "edm"
    return SDXL_SCHEDULE, "eps"


def calculate_sigmas(scheduler: str, steps: int, denoise: float = 1.0,
                     schedule: DiscreteSchedule = SDXL_SCHEDULE, sampler: str | None = None) -> torch.Tensor:
    """The sigma list for `steps` steps (usually steps + 1 values; ddim_uniform and turbo can differ).

    A partial denoise d < 1 computes int(steps / d) steps and keeps the last steps + 1 sigmas.
    With `sampler` in DISCARD_PENULTIMATE_SIGMA_SAMPLERS the schedule is computed for one step more
    and its penultimate sigma dropped, before the partial-denoise tail is taken (Comfy's order).
    `schedule` is the model's table for normal/sgm_uniform/simple/ddim_uniform/turbo/karras/
    exponential; lcm, tcd, align_your_steps and edm_playground_v2.5 use their own.
    """
    if scheduler not in SCHEDULERS:
        raise UnsupportedFeature(f"scheduler '{scheduler}' is not supported by this server yet")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not denoise > 0:
        raise ValueError("denoise must be > 0")
    full = denoise >= 0.9999
    total = steps if full else int(steps / denoise)
    discard = sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = SCHEDULERS[scheduler](total + 1 if discard else total, schedule)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas if full else sigmas[-(steps + 1):]
