"""Samplers in k-diffusion's form: each is `sampler(denoise, x, sigmas, callback=None,
noise_sampler=None, generator=None, **options)`, where `denoise(x, sigma) -> D` is the model's x0
prediction at noise level sigma (VE / k-diffusion space: x = x0 + sigma * eps) and
d = (x - D) / sigma is the probability-flow ODE derivative dx/dsigma.

Conventions
-----------
* `callback(i, x, denoised)` runs once per step i, after that step's first model evaluation, with
  the state x it was evaluated at (k-diffusion's convention; Fooocus swaps the refiner in it). It may
  raise to stop sampling. Exceptions to "one call per step": `restart` calls it per Heun step of its
  own step list (= len(sigmas) - 1 calls for the default restart list), `dpm_fast` once per
  DPM-Solver step (about steps / 3), `dpm_adaptive` once per attempted step (count not known ahead).
* Fresh noise (ANCESTRAL_SAMPLERS: ancestral, ddpm, lcm, tcd, restart) comes from `noise_sampler`
  if one is given (a callable (sigma, sigma_next) -> unit normal like x), otherwise from
  `torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)`, drawn in step
  order and moved to x's device (a CPU generator gives the same noise whatever device x is on).
  With neither, the global RNG is used.
  Fooocus draws this noise with `torch.randn_like` on the GPU's default generator seeded by the
  image seed (not bit-reproducible off CUDA). Here: pass the generator seeded by the image seed
  that already drew the initial latent noise, so the step noise continues its stream (a fresh
  generator with the same seed would replay the initial noise as the first step's noise).
* SDE samplers (SDE_SAMPLERS: dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde and their _gpu aliases) take
  Brownian-motion noise from `noise_sampler` (BrownianTreeNoise over [sigma_min, sigma_max] of the
  run, seeded by the image seed: reference §3.6). Without one they build a tree seeded from
  `generator` (or the global RNG).
* Sigma preparation (not done here): for DISCARD_PENULTIMATE_SIGMA_SAMPLERS (dpm_2,
  dpm_2_ancestral, uni_pc, uni_pc_bh2) pass `sampler=name` to `schedules.calculate_sigmas`, which
  computes steps + 1 sigmas and drops the penultimate one, as Comfy's KSampler does.
* Samplers that do not reach sigma = 0 exactly (reproducing Comfy): dpm_fast / dpm_adaptive stop at
  sigma_min of the list (its last non-zero sigma), uni_pc / uni_pc_bh2 at sigma = 0.001 (Comfy's
  replacement for a final 0), tcd at the VP sample of timestep 0.

* tcd hands the callback its intermediate x_s (Comfy does too), not the raw x0 prediction.

The numerical work is done on x's dtype (float32 in the server) with scalar math on the float32
sigma tensors, like k-diffusion; the LMS and UniPC coefficients are computed in float64.
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .schedules import (
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS,
    SDXL_SCHEDULE,
    DiscreteSchedule,
    karras_sigmas,
)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None

__all__ = [
    "ANCESTRAL_SAMPLERS",
    "DETERMINISTIC_SAMPLERS",
    "DISCARD_PENULTIMATE_SIGMA_SAMPLERS",
    "SAMPLERS",
    "SCHEDULE_SAMPLERS",
    "SDE_SAMPLERS",
    "BrownianTreeNoise",
    "ancestral_step",
]


# ----------------------------------------------------------------------------- helpers

def _fresh_noise(x: torch.Tensor, noise_sampler: NoiseSampler, generator: torch.Generator | None):
    """The noise source of ancestral-type samplers (see module docstring)."""
    if noise_sampler is not None:
        return noise_sampler

    def draw(_sigma, _sigma_next):
        if generator is None:
            return torch.randn_like(x)
        # Drawn where the generator lives (the CPU, for seed parity with every device), then moved.
        return to_device(torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device), x.device)

    return draw


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`; a host tensor goes to a CUDA device through pinned memory without
    blocking the host (the step loop never waits for the device)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _brownian_noise(x: torch.Tensor, sigmas: torch.Tensor, noise_sampler: NoiseSampler,
                    generator: torch.Generator | None):
    """The noise source of SDE samplers: the given Brownian sampler, else a tree over the list."""
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return BrownianTreeNoise(x, float(positive.min()), float(positive.max()), seed)


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step sigma -> sigma' into a deterministic part down to sigma_down and fresh noise of
    std sigma_up, sigma_down^2 + sigma_up^2 = sigma'^2 (the DDPM posterior for eta = 1: Song et al.
    2021 DDIM eq. 16 written in sigma space, as in k-diffusion's `get_ancestral_step`):
        sigma_up = min(sigma', eta * sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2))."""
    if not eta:
        return sigma_to, sigma_to * 0
    sigma_up = torch.minimum(torch.as_tensor(sigma_to),
                             eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _call(callback: Callback, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, x, denoised)


# ----------------------------------------------------------------------------- first / second order ODE

@torch.no_grad()
def sample_euler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                 noise_sampler: NoiseSampler = None, generator=None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 with s_churn = 0).

    Also Fooocus's `ddim`: DDIM with eta = 0 (Song et al. 2021, eq. 12) is exactly this Euler step
    in sigma space: x' = D + sigma' (x - D) / sigma."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        _call(callback, i, x, denoised)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                           noise_sampler: NoiseSampler = None, generator=None, eta: float = 1.0,
                           s_noise: float = 1.0) -> torch.Tensor:
    """Ancestral Euler ("Euler a"; k-diffusion): an Euler step down to sigma_down, then fresh noise of
    std sigma_up (see `ancestral_step`; Ho et al. 2020 ancestral sampling in sigma space)."""
    noise = _fresh_noise(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _call(callback, i, x, denoised)
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                noise_sampler: NoiseSampler = None, generator=None) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1 / 2 with s_churn = 0): average the
    slopes at both ends; the final step to sigma = 0 is a plain Euler step."""
    for i in range(len(sigmas) - 1):
        x = _heun_step(denoise, x, sigmas[i], sigmas[i + 1], lambda d, i=i, xi=x: _call(callback, i, xi, d))
    return x


def _heun_step(denoise, x, sigma, sigma_next, on_first):
    denoised = denoise(x, sigma)
    on_first(denoised)
    d = _to_d(x, sigma, denoised)
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + d * dt
    x_2 = x + d * dt
    d_2 = _to_d(x_2, sigma_next, denoise(x_2, sigma_next))
    return x + (d + d_2) / 2 * dt


@torch.no_grad()
def sample_heunpp2(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                   noise_sampler: NoiseSampler = None, generator=None) -> torch.Tensor:
    """Heun++ ("heunpp2", from the MIT-licensed sd-webui-samplers-scheduler, as shipped by Comfy):
    a Heun-type step whose slope is a weighted mix of the slopes at sigma_i, sigma_{i+1} and
    sigma_{i+2} (two and three Euler predictor points), the weights of the look-ahead slopes being
    sigma_{i+1} / (3 sigma_0) and sigma_{i+2} / (3 sigma_0) (sigma_{i+1} / (2 sigma_0) with only one
    look-ahead point, on the penultimate step). The last step is Euler."""
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        _call(callback, i, x, denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1]))
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1]))
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = _to_d(x_3, sigmas[i + 2], denoise(x_3, sigmas[i + 2]))
            w2 = sigmas[i + 1] / (3 * sigmas[0])
            w3 = sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def _log_midpoint(a, b):
    """exp of the midpoint of log a and log b (the geometric mean)."""
    return a.log().lerp(b.log(), 0.5).exp()


@torch.no_grad()
def sample_dpm_2(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                 noise_sampler: NoiseSampler = None, generator=None) -> torch.Tensor:
    """DPM-Solver-2 in the Karras ODE form (Lu et al. 2022, Algorithm 1 with r = 1/2, as k-diffusion's
    `sample_dpm_2` / Karras et al. 2022 Algorithm 2): an Euler half-step to the geometric midpoint
    sigma_mid = sqrt(sigma sigma'), then the full step with the slope there. Euler to sigma = 0.
    Fooocus computes the list with one extra sigma and drops the penultimate (calculate_sigmas)."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        _call(callback, i, x, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = _log_midpoint(sigmas[i], sigmas[i + 1])
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = _to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                           noise_sampler: NoiseSampler = None, generator=None, eta: float = 1.0,
                           s_noise: float = 1.0) -> torch.Tensor:
    """Ancestral DPM-Solver-2 (k-diffusion's `sample_dpm_2_ancestral`): the DPM-Solver-2 step of
    `sample_dpm_2` down to sigma_down, then fresh noise of std sigma_up (`ancestral_step`)."""
    noise = _fresh_noise(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _call(callback, i, x, denoised)
        d = _to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = _log_midpoint(sigmas[i], sigma_down)
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = _to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """Adams-Bashforth weight of the derivative at sigma_{i-j} for the step sigma_i -> sigma_{i+1}:
    the integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial through
    sigma_i, ..., sigma_{i-order+1} that is 1 at sigma_{i-j}. Integrated exactly (k-diffusion and
    diffusers use scipy.integrate.quad, which is exact to rounding for these low degrees)."""
    basis = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            basis = basis * np.poly1d([1.0, -sigmas[i - k]]) / (sigmas[i - j] - sigmas[i - k])
    integral = basis.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


@torch.no_grad()
def sample_lms(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
               noise_sampler: NoiseSampler = None, generator=None, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) on the Karras ODE in sigma, order 4 after a warm-up of
    lower orders (Karras et al. 2022 / k-diffusion's `sample_lms`; `lms_coefficient`)."""
    sig = sigmas.detach().cpu().double().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        ds.append(_to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        _call(callback, i, x, denoised)
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(sig, i, cur_order, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


# ----------------------------------------------------------------------------- DPM-Solver (eps form)

class _DPMSolver:
    """DPM-Solver-1/2/3 single steps (Lu et al. 2022, "DPM-Solver", Algorithms 1 and 2 / eqs. 3.6-3.8)
    for the noise-prediction model eps = (x - D) / sigma, in half-log-SNR time t = -ln(sigma) of the
    VE process (alpha = 1): x_{t'} = x - sigma(t') (e^h - 1) eps + higher-order corrections."""

    def __init__(self, denoise: Denoiser):
        self.denoise = denoise

    @staticmethod
    def sigma(t):
        return t.neg().exp()

    def eps(self, cache: dict, key: str, x, t):
        if key not in cache:
            cache[key] = (x - self.denoise(x, self.sigma(t))) / self.sigma(t)
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - self.sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=0.5):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return (x - self.sigma(t_next) * h.expm1() * eps
                - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps))

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return (x - self.sigma(t_next) * h.expm1() * eps
                - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps))


def _dpm_range(sigmas: torch.Tensor):
    """Comfy's dpm_fast/dpm_adaptive wrappers: sigma_max = sigmas[0], sigma_min = sigmas[-1], or
    sigmas[-2] when the list ends in 0. The rest of the list is ignored."""
    sigma_min = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    if sigma_min <= 0 or sigmas[0] <= 0:
        raise ValueError("dpm_fast/dpm_adaptive need a positive sigma range")
    return sigma_min, sigmas[0]


def dpm_fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast's order schedule (Lu et al. 2022, Sec. 3.4 / Appendix D.1): K = nfe // 3 + 1
    steps of order 3, the tail adjusted so the orders sum to nfe."""
    m = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (m - 2) + [2, 1]
    return [3] * (m - 1) + [nfe % 3]


@torch.no_grad()
def sample_dpm_fast(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                    noise_sampler: NoiseSampler = None, generator=None) -> torch.Tensor:
    """DPM-Solver-fast (Lu et al. 2022, "DPM-Solver", Sec. 3.4): a fixed budget of len(sigmas) - 1
    model evaluations spent on `dpm_fast_orders` steps of DPM-Solver-3/2/1, uniform in
    t = -ln(sigma) from sigmas[0] to sigma_min (`_dpm_range`); the given sigma list is otherwise
    ignored and the result is x at sigma_min (not 0), as in Comfy. Deterministic (eta = 0).
    callback once per DPM-Solver step."""
    sigma_min, sigma_max = _dpm_range(sigmas)
    solver = _DPMSolver(denoise)
    orders = dpm_fast_orders(len(sigmas) - 1)
    ts = torch.linspace(float(-sigma_max.log()), float(-sigma_min.log()), len(orders) + 1)
    for i, order in enumerate(orders):
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        eps = solver.eps(cache, "eps", x, t)
        _call(callback, i, x, x - solver.sigma(t) * eps)
        step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}[order]
        x = step(x, t, t_next, cache)
    return x


@torch.no_grad()
def sample_dpm_adaptive(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                        noise_sampler: NoiseSampler = None, generator=None, order: int = 3,
                        rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                        pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                        accept_safety: float = 0.81) -> torch.Tensor:
    """DPM-Solver-12 / 23 with adaptive step size (Lu et al. 2022, "DPM-Solver", Sec. 3.4 and
    Algorithm 5): each attempt takes a lower-order (DPM-Solver-2 with r1 = 1/3, or -1) and a
    higher-order (DPM-Solver-3, or -2) step sharing evaluations; the scaled RMS of their difference,
    with delta = max(atol, rtol * max(|x_low|, |x_prev|)), drives a PID step-size controller
    (k-diffusion's defaults: integral-only, accept when the factor >= 0.81). Runs in
    t = -ln(sigma) from sigmas[0] to sigma_min (`_dpm_range`), ignoring the rest of the list; returns
    x at sigma_min, as in Comfy. Deterministic (eta = 0). callback once per attempt."""
    if order not in (2, 3):
        raise ValueError("order must be 2 or 3")
    sigma_min, sigma_max = _dpm_range(sigmas)
    solver = _DPMSolver(denoise)
    s = -sigma_max.log()
    t_end = -sigma_min.log()
    controller = _PIDController(h_init, pcoeff, icoeff, dcoeff, order, accept_safety)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    x_prev = x
    attempt = 0
    while s < t_end - 1e-5:
        cache: dict = {}
        t = torch.minimum(t_end, s + controller.h)
        eps = solver.eps(cache, "eps", x, s)
        denoised = x - solver.sigma(s) * eps
        if order == 2:
            x_low = solver.step_1(x, s, t, cache)
            x_high = solver.step_2(x, s, t, cache)
        else:
            x_low = solver.step_2(x, s, t, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t, cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        _call(callback, attempt, x, denoised)
        attempt += 1
        if controller.propose(float(error)):
            x_prev = x_low
            x = x_high
            s = t
    return x


class _PIDController:
    """PID step-size controller (Söderlind 2003, "Digital filters in adaptive time-stepping"), as in
    k-diffusion: factor = limiter(e0^b1 e1^b2 e2^b3) on inverse errors, limiter(f) = 1 + atan(f - 1);
    the step is accepted when factor >= accept_safety; h is scaled by the factor either way."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


# ----------------------------------------------------------------------------- DPM-Solver++ (data prediction)

@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                              noise_sampler: NoiseSampler = None, generator=None, eta: float = 1.0,
                              s_noise: float = 1.0) -> torch.Tensor:
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022, "DPM-Solver++", Algorithm 1 with r = 1/2, single
    step): with t = -ln(sigma), a first-order step to the lambda-midpoint s of [t, t_down], the
    model there, then x <- (sigma_down / sigma) x - (e^{-h} - 1) D_s; fresh noise sigma_up on top
    (`ancestral_step`). Euler when sigma_down = 0."""
    noise = _fresh_noise(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _call(callback, i, x, denoised)
        if sigma_down == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = -sigmas[i].log(), -sigma_down.log()
            h = t_next - t
            s = t + 0.5 * h
            sigma_s = s.neg().exp()
            x_2 = (sigma_s / sigmas[i]) * x - (-0.5 * h).expm1() * denoised
            denoised_2 = denoise(x_2, sigma_s)
            x = (sigma_down / sigmas[i]) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                     noise_sampler: NoiseSampler = None, generator=None, eta: float = 1.0,
                     s_noise: float = 1.0, r: float = 0.5) -> torch.Tensor:
    """DPM-Solver++ SDE, 2-stage (k-diffusion's `sample_dpmpp_sde`; Lu et al. 2022 "DPM-Solver++"
    with the ancestral/SDE noise split of Karras et al.): with t = -ln(sigma), h = t' - t and the
    intermediate point s = t + r h, an ancestral first-order step to s with Brownian noise, the model
    at s, then an ancestral step to t' using D' = (1 - 1/(2r)) D_t + 1/(2r) D_s, Brownian noise on
    top. Two model calls per step; the last step (sigma' = 0) is Euler."""
    if len(sigmas) <= 1:
        return x
    noise = _brownian_noise(x, sigmas, noise_sampler, generator)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        _call(callback, i, x, denoised)
        if sigmas[i + 1] == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        s = t + h * r
        sigma_t, sigma_s = t.neg().exp(), s.neg().exp()
        # stage 1: ancestral step t -> s
        sd, su = ancestral_step(sigma_t, sigma_s, eta)
        s_ = -sd.log()
        x_2 = (sd / sigma_t) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(sigma_t, sigma_s) * s_noise * su
        denoised_2 = denoise(x_2, sigma_s)
        # stage 2: ancestral step t -> t' with the combined prediction
        sigma_next = t_next.neg().exp()
        sd, su = ancestral_step(sigma_t, sigma_next, eta)
        t_next_ = -sd.log()
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sd / sigma_t) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise(sigma_t, sigma_next) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                    noise_sampler: NoiseSampler = None, generator=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): with t = -ln(sigma),
    h = t' - t and r = h_prev / h,
        D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  x <- (sigma'/sigma) x - (e^{-h} - 1) D'
    first order (D' = D_i) on the first step and on the step to sigma = 0."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        _call(callback, i, x, denoised)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            denoised_d = denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                        noise_sampler: NoiseSampler = None, generator=None, eta: float = 1.0,
                        s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022, "DPM-Solver++", data prediction).

    With lambda = -log(sigma), h = lambda_{i+1} - lambda_i and r = h_{i-1} / h:
        x <- (sigma_{i+1}/sigma_i) e^{-eta h} x + (1 - e^{-(1+eta) h}) D_i
        x <- x + 1/2 (1 - e^{-(1+eta) h}) (1/r) (D_i - D_{i-1})      (from the second step on)
        x <- x + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z_i                (z_i from the Brownian tree)
    The last step (sigma_{i+1} = 0) returns D_i.
    """
    if len(sigmas) <= 1:
        return x
    noise = _brownian_noise(x, sigmas, noise_sampler, generator) if eta else None
    old_denoised = None
    h_last = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        _call(callback, i, x, denoised)
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
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                        noise_sampler: NoiseSampler = None, generator=None, eta: float = 1.0,
                        s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's `sample_dpmpp_3m_sde`; Lu et al. 2022 "DPM-Solver++"
    multistep with the SDE exponent h_eta = (1 + eta) h, reference §3.6):
        x <- e^{-h_eta} x + (1 - e^{-h_eta}) D_i
        phi2 = (e^{-h_eta} - 1)/h_eta + 1,  phi3 = phi2/h_eta - 1/2
        one history:  x += phi2 (D_i - D_{i-1}) / r                           (r = h_{i-1}/h)
        two histories: d1_0 = (D_i - D_{i-1})/r0, d1_1 = (D_{i-1} - D_{i-2})/r1,
                       d1 = d1_0 + (d1_0 - d1_1) r0/(r0 + r1), d2 = (d1_0 - d1_1)/(r0 + r1),
                       x += phi2 d1 - phi3 d2
        x += sigma_{i+1} sqrt(1 - e^{-2 eta h}) z   (Brownian);  sigma_{i+1} = 0 -> x = D_i."""
    if len(sigmas) <= 1:
        return x
    noise = _brownian_noise(x, sigmas, noise_sampler, generator) if eta else None
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        _call(callback, i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# ----------------------------------------------------------------------------- DDPM / LCM / TCD

@torch.no_grad()
def sample_ddpm(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                noise_sampler: NoiseSampler = None, generator=None) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2, posterior variance beta~_t) between the
    alphā's of consecutive sigmas (alphā = 1 / (1 + sigma^2), alpha = alphā / alphā'): in VP space
        mu = (x_vp - (1 - alpha) eps / sqrt(1 - alphā)) / sqrt(alpha),
        x_vp' = mu + sqrt((1 - alpha)(1 - alphā') / (1 - alphā)) z   (no noise into sigma' = 0),
    converted back to VE (x = x_vp sqrt(1 + sigma^2)) in between."""
    noise = _fresh_noise(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        _call(callback, i, x, denoised)
        eps = (x - denoised) / sigma
        abar = 1 / (sigma * sigma + 1)
        abar_prev = 1 / (sigma_next * sigma_next + 1)
        alpha = abar / abar_prev
        x_vp = x / torch.sqrt(1.0 + sigma**2)
        mu = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - abar).sqrt())
        if sigma_next > 0:
            mu = mu + ((1 - alpha) * (1.0 - abar_prev) / (1.0 - abar)).sqrt() * noise(sigma, sigma_next)
        x = mu * torch.sqrt(1.0 + sigma_next**2) if sigma_next != 0 else mu
    return x


@torch.no_grad()
def sample_lcm(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
               noise_sampler: NoiseSampler = None, generator=None) -> torch.Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency Models",
    Algorithm 3): jump to the consistency prediction D, then re-noise to the next level,
    x <- D + sigma' z (no noise into sigma' = 0). The consistency parameterisation itself belongs to
    the denoiser (`schedules.lcm_denoised`), used when the scheduler is `lcm`."""
    noise = _fresh_noise(x, noise_sampler, generator)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        _call(callback, i, x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_tcd(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
               noise_sampler: NoiseSampler = None, generator=None, eta: float = 0.3,
               schedule: DiscreteSchedule = SDXL_SCHEDULE) -> torch.Tensor:
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, "TCD",
    Sec. 4.4 / Algorithm 4) with gamma = eta = 0.3: from the x0 and eps predictions at t_i, go to the
    intermediate timestep s = floor((1 - eta) t_{i+1}) (alphā_s from `schedule`'s 1000-entry table,
    s = 0 for the last step):  x_s = sqrt(alphā_s) D + sqrt(1 - alphā_s) eps  (VP), then forward-diffuse
    to sigma_{i+1}: x <- x_s / sqrt(alphā_s) + sqrt(sigma'^2 + 1 - 1/alphā_s) z (VE). The callback gets
    x_s. The final step returns x_s at s = 0 (Comfy; not exactly x0). `schedule` must be the model's
    active one (LCM_SCHEDULE under the tcd scheduler) since t_i = schedule.timestep(sigma_i)."""
    noise = _fresh_noise(x, noise_sampler, generator)
    timesteps_s = torch.floor((1 - eta) * schedule.timestep(sigmas)).long()
    timesteps_s[-1] = 0
    alpha_s = schedule.alphas_cumprod[timesteps_s].to(x.dtype)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        eps = (x - denoised) / sigmas[i]
        x_s = alpha_s[i + 1].sqrt() * denoised + (1 - alpha_s[i + 1]).sqrt() * eps
        _call(callback, i, x, x_s)
        if eta > 0 and sigmas[i + 1] > 0:
            x = x_s / alpha_s[i + 1].sqrt() + noise(sigmas[i], sigmas[i + 1]) * (
                sigmas[i + 1] ** 2 + 1 - 1 / alpha_s[i + 1]).sqrt()
        else:
            x = x_s * torch.sqrt(1.0 + sigmas[i + 1] ** 2)
    return x


# ----------------------------------------------------------------------------- Restart

def restart_step_list(sigmas: torch.Tensor, restart_list: dict | None = None):
    """(sigma, sigma') pairs of Restart sampling (Xu et al. 2023, "Restart Sampling for Improving
    Generative Processes"), Comfy's default list: for len(sigmas) - 1 = steps >= 20, the main
    schedule is replaced by karras(steps - K * n, sigmas[-2], sigmas[0]) and, after reaching the
    sigma nearest 0.1, a restart interval up to the sigma nearest 2 is run n times with K steps of a
    karras(K + 1) sub-schedule: K = 9, n = 1 for 20 <= steps < 36; K = steps // 4, n = 2 above
    (so the Heun-step count stays `steps`). Below 20 steps there is no restart (plain Heun).
    `restart_list` maps sigma -> [restart_steps, restart_times, restart_max] like Comfy's."""
    steps = len(sigmas) - 1
    if restart_list is None:
        if steps >= 20:
            restart_steps, restart_times = 9, 1
            if steps >= 36:
                restart_steps, restart_times = steps // 4, 2
            sigmas = karras_sigmas(steps - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0]))
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
        else:
            restart_list = {}
    by_index = {int(torch.argmin((sigmas - key).abs())): value for key, value in restart_list.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in by_index:
            restart_steps, restart_times, restart_max = by_index[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin((sigmas - restart_max).abs()))
            if max_idx < min_idx:
                sub = karras_sigmas(restart_steps, float(sigmas[min_idx]), float(sigmas[max_idx]))[:-1]
                for _ in range(restart_times):
                    pairs.extend(itertools.pairwise(sub))
    return pairs


@torch.no_grad()
def sample_restart(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                   noise_sampler: NoiseSampler = None, generator=None, s_noise: float = 1.0,
                   restart_list: dict | None = None) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023): Heun steps along `restart_step_list`; whenever the list
    jumps back up from sigma_a to sigma_b > sigma_a, fresh noise of std sqrt(sigma_b^2 - sigma_a^2)
    re-noises the sample (the "restart" forward jump). Note that for >= 20 steps the given list
    only contributes its first sigma and its last non-zero one (Comfy's default)."""
    noise = _fresh_noise(x, noise_sampler, generator)
    last_sigma = None
    for step_id, (old_sigma, new_sigma) in enumerate(restart_step_list(sigmas, restart_list)):
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + noise(last_sigma, old_sigma) * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        x = _heun_step(denoise, x, old_sigma, new_sigma, lambda d, i=step_id, xi=x: _call(callback, i, xi, d))
        last_sigma = new_sigma
    return x


# ----------------------------------------------------------------------------- UniPC

def _unipc_coefficients(hh: float, order: int, variant: str):
    """B(h), h*phi_1(h) and the (R, b) system of UniPC's B(h) variants (Zhao et al. 2023, "UniPC",
    Algorithms 1-2 / Appendix: phi_k recursion, B1(h) = h, B2(h) = e^h - 1) for data prediction,
    where hh = -h (h = lambda_t - lambda_s > 0)."""
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, np.asarray(b)


@torch.no_grad()
def _sample_unipc(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback,
                  variant: str, max_order: int = 3) -> torch.Tensor:
    """UniPC multistep (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
    Sampling of Diffusion Models"), data-prediction form, B(h) = h (bh1) or e^h - 1 (bh2), written
    in VE sigma space (lambda = -ln sigma; VP x = x_ve / sqrt(1 + sigma^2) cancels out):
        x_t = (sigma_t / sigma_s) x_s - (e^{-h} - 1) D_s - B(h) sum_k rho_k D1_k,
        D1_k = (D_{s_k} - D_s) / r_k,  r_k = (lambda_{s_k} - lambda_s) / h.
    UniP predicts (rho from R[:-1, :-1] rho = b[:-1]; rho = 1/2 at order 2), the model is evaluated
    at the prediction, and UniC corrects with that evaluation (rho from R rho = b; 1/2 at order 1);
    the evaluation is reused as history. As Comfy's `sample_unipc`: order = min(3, steps - 1) with
    warm-up and final-step order lowering (order_k = min(order, k, steps + 1 - k)), no corrector on
    the final step, and a final sigma of 0 replaced by 0.001 (the result is x at sigma = 0.001).
    (Comfy evaluates lambda through a float32 VP detour that loses ~2% of lambda at sigma = 0.001;
    we use lambda = -ln sigma in float64.) With a single step, one first-order step is taken (Comfy's
    order = 0 would return the input)."""
    sig = sigmas.clone()
    if sig[-1] == 0:
        sig[-1] = 0.001
    n = len(sig) - 1
    if n < 1:
        return x
    lam = [-math.log(float(s)) for s in sig]
    order = max(min(max_order, n - 1), 1)
    denoised = denoise(x, sig[0])
    _call(callback, 0, x, denoised)
    hist_d, hist_lam = [denoised], [lam[0]]
    for k in range(1, n + 1):
        p = min(order, k, n + 1 - k)
        lam_s, d_s = hist_lam[-1], hist_d[-1]
        h = lam[k] - lam_s
        rks, d1s = [], []
        for m in range(1, p):
            rk = (hist_lam[-(m + 1)] - lam_s) / h
            rks.append(rk)
            d1s.append((hist_d[-(m + 1)] - d_s) / rk)
        rks.append(1.0)
        h_phi_1, b_h, b = _unipc_coefficients(-h, p, variant)
        big_r = np.stack([np.asarray(rks) ** (i - 1) for i in range(1, p + 1)])
        x_base = (sig[k] / sig[k - 1]) * x - h_phi_1 * d_s
        if p == 1:
            x_pred = x_base
        else:
            rhos_p = [0.5] if p == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1])
            x_pred = x_base - b_h * sum(float(r) * d for r, d in zip(rhos_p, d1s))
        if k == n:
            x = x_pred
            break
        denoised = denoise(x_pred, sig[k])
        rhos_c = [0.5] if p == 1 else np.linalg.solve(big_r, b)
        corr = sum((float(r) * d for r, d in zip(rhos_c[:-1], d1s)), torch.zeros_like(x))
        x = x_base - b_h * (corr + float(rhos_c[-1]) * (denoised - d_s))
        hist_d.append(denoised)
        hist_lam.append(lam[k])
        if len(hist_d) > order:
            hist_d.pop(0)
            hist_lam.pop(0)
        _call(callback, k, x_pred, denoised)
    return x


def sample_uni_pc(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                  noise_sampler: NoiseSampler = None, generator=None) -> torch.Tensor:
    """UniPC, B1(h) = h variant (Zhao et al. 2023); see `_sample_unipc`."""
    return _sample_unipc(denoise, x, sigmas, callback, "bh1")


def sample_uni_pc_bh2(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                      noise_sampler: NoiseSampler = None, generator=None) -> torch.Tensor:
    """UniPC, B2(h) = e^h - 1 variant (Zhao et al. 2023); see `_sample_unipc`."""
    return _sample_unipc(denoise, x, sigmas, callback, "bh2")


# ----------------------------------------------------------------------------- Brownian noise

class BrownianTreeNoise:
    """Noise for SDE samplers from one Brownian motion W over [sigma_min, sigma_max], seeded by the
    image seed (Fooocus uses one tree per diffusion run). For the interval (sigma, sigma') it
    returns (W(sigma') - W(sigma)) / sqrt(|sigma' - sigma|), a unit normal that is the same for
    the same seed whatever the step count, so SDE samplers converge as steps grow.

    The tree lives on the CPU whatever x's device (its noise is moved to x's device): the same
    seed gives the same noise on every device. (Fooocus's `_gpu` samplers grow it on the GPU, whose
    generator draws other numbers.)"""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: int):
        import torchsde  # the Brownian interval implementation k-diffusion and Fooocus use

        self.device = x.device
        self.tree = torchsde.BrownianTree(
            t0=float(sigma_min), w0=torch.zeros(x.shape, dtype=x.dtype),
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
        return to_device(w / abs(float(sigma_next) - float(sigma)) ** 0.5, self.device)


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": sample_dpmpp_sde,  # Fooocus: the _gpu suffix only moves the Brownian tree to the GPU
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": sample_dpmpp_3m_sde,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "tcd": sample_tcd,
    "restart": sample_restart,
    "ddim": sample_euler,  # Fooocus: ksampler("euler") (its seed+1 inpaint noise never reaches the output)
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}
# Brownian-tree noise (pass noise_sampler=BrownianTreeNoise(x, sigma_min, sigma_max, seed)).
SDE_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
                          "dpmpp_3m_sde", "dpmpp_3m_sde_gpu"})
# Fresh i.i.d. noise per step (pass generator=..., seeded by the image seed).
ANCESTRAL_SAMPLERS = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "ddpm",
                                "lcm", "tcd", "restart"})
# Deterministic given the initial noise.
DETERMINISTIC_SAMPLERS = frozenset(SAMPLERS) - SDE_SAMPLERS - ANCESTRAL_SAMPLERS
# Need the model's active schedule (pass schedule=...; LCM_SCHEDULE under the lcm/tcd schedulers).
SCHEDULE_SAMPLERS = frozenset({"tcd"})
