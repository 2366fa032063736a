"""Every sampler and scheduler Fooocus accepts (reference §2.1, §2.2, §3.5, §3.6), each against an
independent reference on the toy denoiser of test_sampler_math.py.

References:
  * diffusers schedulers where the update rule is the same math (stepped by hand; VP schedulers
    get x_vp = x_ve / sqrt(1 + sigma^2) and are compared back in VE space), with identical noise
    injected (the same torch.Generator seed, or a recorded noise sequence);
  * otherwise the update written out here as a plain float64 loop from the paper / reference
    formula;
  * the numbers and formulas published in /work/shared/reference/fooocus_semantics.md §3.5;
  * a "smoke" property per sampler: with a denoiser that always returns the same x0, every
    sampler lands on the exact probability-flow-ODE solution x0 + (sigma_end / sigma_0)(x_T - x0)
    (sigma_end = 0 for most; ancestral/SDE samplers collapse to x0 on their last step).
Tolerances: float32 implementation vs float32 diffusers on the same sigma list: rtol 1e-6, atol 2e-5
(the worst seen is 7.6e-6); float32 vs a float64 loop: the same unless said otherwise.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.samplers import (
    ANCESTRAL_SAMPLERS,
    DETERMINISTIC_SAMPLERS,
    SAMPLERS,
    SDE_SAMPLERS,
    BrownianTreeNoise,
    dpm_fast_orders,
    restart_step_list,
    sample_ddpm,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpm_adaptive,
    sample_dpm_fast,
    sample_dpmpp_2m,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler_ancestral,
    sample_heun,
    sample_heunpp2,
    sample_lcm,
    sample_lms,
    sample_restart,
    sample_tcd,
    sample_uni_pc,
    sample_uni_pc_bh2,
)
from pipeline.schedules import (
    AYS_SDXL_NOISE_LEVELS,
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS,
    EDM_PLAYGROUND_SCHEDULE,
    LCM_SCHEDULE,
    SCHEDULERS,
    SDXL_SCHEDULE,
    calculate_sigmas,
    edm_denoised,
    karras_sigmas,
    lcm_denoised,
    model_sampling_for,
)
from tests.test_sampler_math import (
    SD_BETAS,
    FixedNoise,
    assert_close,
    loglinear_sigma_f64,
    sdxl_sigma_table_f64,
    seeded_noise,
    toy_denoise,
    toy_eps,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

RTOL, ATOL = 1e-6, 2e-5  # largest deviation seen: 7.6e-6 (uni_pc, float32 coefficients in diffusers)
ULP2 = 2.4e-7  # two float32 ulps: sigma(t) = exp(log sigma_t) round trip on table timesteps

SAMPLER_NAMES_REF = [  # reference §2.1
    "euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
    "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "tcd", "restart", "ddim",
    "uni_pc", "uni_pc_bh2",
]
SCHEDULER_NAMES_REF = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "lcm",
                       "turbo", "align_your_steps", "tcd", "edm_playground_v2.5"]  # reference §2.2


def test_every_fooocus_name_is_implemented():
    assert set(SAMPLERS) == set(SAMPLER_NAMES_REF)
    assert set(SCHEDULERS) == set(SCHEDULER_NAMES_REF)
    # every sampler is in exactly one noise class
    assert SDE_SAMPLERS | ANCESTRAL_SAMPLERS | DETERMINISTIC_SAMPLERS == set(SAMPLERS)
    assert not (SDE_SAMPLERS & ANCESTRAL_SAMPLERS)
    for name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        assert SAMPLERS[name] is SAMPLERS[name + "_gpu"] and name in SDE_SAMPLERS
    assert SAMPLERS["ddim"] is SAMPLERS["euler"]  # reference §2.1: ddim is plain Euler in Fooocus


# ----------------------------------------------------------------------------- diffusers driver

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def drive_ve(sched, x, sigma_of, **step_kw):
    """Step a k-diffusion-style (VE) diffusers scheduler with the toy model (evaluated at the sigma
    the scheduler scales its input with, `sigma_of(sched)`); returns the final x."""
    for t in sched.timesteps:
        xin = sched.scale_model_input(x, t)
        sigma = sigma_of(sched)
        x = sched.step(toy_eps(xin, sigma), t, x, **step_kw).prev_sample
    return x


def base_sigmas(layout: torch.Tensor) -> torch.Tensor:
    """The step sigmas behind diffusers' interleaved 2nd-order layouts ([s0, s1, s1, s2, s2, ...])."""
    return torch.unique_consecutive(layout)


def start(sigmas, seed=7):
    return seeded_noise(seed=seed) * (1 + sigmas[0] ** 2) ** 0.5


# ----------------------------------------------------------------------------- 1. euler_ancestral

@pytest.mark.parametrize("n", [8, 20])
def test_euler_ancestral_matches_diffusers(n):
    sigmas = calculate_sigmas("karras", n)
    sched = EulerAncestralDiscreteScheduler(**SD_BETAS)
    sched.set_timesteps(n)
    sched.sigmas = sigmas.clone()  # same sigma list; step() only reads sched.sigmas
    sched.set_begin_index(0)
    ref = drive_ve(sched, start(sigmas), lambda s: s.sigmas[s.step_index], generator=gen(3))
    ours = sample_euler_ancestral(toy_denoise, start(sigmas), sigmas, generator=gen(3))
    assert_close(ours, ref, RTOL, ATOL, "euler_ancestral vs diffusers")
    # seeded: same generator seed -> same image, another seed -> another one
    again = sample_euler_ancestral(toy_denoise, start(sigmas), sigmas, generator=gen(3))
    other = sample_euler_ancestral(toy_denoise, start(sigmas), sigmas, generator=gen(4))
    assert torch.equal(ours, again) and (ours - other).abs().max() > 1e-2


# ----------------------------------------------------------------------------- 2. heun, dpm_2, dpm_2_ancestral, lms

@pytest.mark.parametrize("n", [6, 15])
def test_heun_matches_diffusers(n):
    sched = HeunDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True)
    sched.set_timesteps(n)
    sched.set_begin_index(0)
    sigmas = base_sigmas(sched.sigmas)
    assert len(sigmas) == n + 1
    assert_close(sigmas, calculate_sigmas("karras", n), 1e-5, 1e-7, "diffusers karras")
    ref = drive_ve(sched, start(sigmas), lambda s: s.sigmas[s.step_index])
    calls = []
    ours = sample_heun(toy_denoise, start(sigmas), sigmas, callback=lambda i, x, d: calls.append(i))
    assert calls == list(range(n))
    assert_close(ours, ref, RTOL, ATOL, "heun vs diffusers")


def kdpm2_sigma(s):
    return s.sigmas[s.step_index] if s.state_in_first_order else s.sigmas_interpol[s.step_index]


@pytest.mark.parametrize("n", [6, 15])
def test_dpm_2_matches_diffusers(n):
    sched = KDPM2DiscreteScheduler(**SD_BETAS, use_karras_sigmas=True)
    sched.set_timesteps(n)
    sched.set_begin_index(0)
    sigmas = base_sigmas(sched.sigmas)
    assert len(sigmas) == n + 1
    ref = drive_ve(sched, start(sigmas), kdpm2_sigma)
    ours = sample_dpm_2(toy_denoise, start(sigmas), sigmas)
    assert_close(ours, ref, RTOL, ATOL, "dpm_2 vs diffusers KDPM2")


def kdpm2a_sigma(s):
    return s.sigmas[s.step_index] if s.state_in_first_order else s.sigmas_interpol[s.step_index - 1]


@pytest.mark.parametrize("n", [6, 15])
def test_dpm_2_ancestral_matches_diffusers(n):
    sched = KDPM2AncestralDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True)
    sched.set_timesteps(n)
    sched.set_begin_index(0)
    sigmas = base_sigmas(sched.sigmas)
    ref = drive_ve(sched, start(sigmas), kdpm2a_sigma, generator=gen(11))
    ours = sample_dpm_2_ancestral(toy_denoise, start(sigmas), sigmas, generator=gen(11))
    assert_close(ours, ref, RTOL, ATOL, "dpm_2_ancestral vs diffusers KDPM2Ancestral")


@pytest.mark.parametrize("n", [5, 20])
def test_lms_matches_diffusers(n):
    sched = LMSDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True)
    sched.set_timesteps(n)
    sched.set_begin_index(0)
    sigmas = sched.sigmas.clone()
    ref = drive_ve(sched, start(sigmas), lambda s: s.sigmas[s.step_index])
    ours = sample_lms(toy_denoise, start(sigmas), sigmas)
    # diffusers integrates the Lagrange basis with scipy quad (epsrel 1e-4, exact for these cubic
    # polynomials up to rounding); we integrate the polynomial exactly.
    assert_close(ours, ref, RTOL, ATOL, "lms vs diffusers")


# ----------------------------------------------------------------------------- 3. dpmpp_sde / dpmpp_2m

@pytest.mark.parametrize("n", [6, 12])
def test_dpmpp_sde_matches_diffusers(n):
    sched = DPMSolverSDEScheduler(**SD_BETAS, use_karras_sigmas=True)
    sched.set_timesteps(n)
    sched.set_begin_index(0)
    sigmas = base_sigmas(sched.sigmas)
    zs = [seeded_noise(seed=500 + k) for k in range(2 * n)]
    ref_noise, our_noise = FixedNoise(zs), FixedNoise(zs)
    sched.noise_sampler = ref_noise  # diffusers would build its own Brownian tree otherwise
    ref = drive_ve(sched, start(sigmas),
                   lambda s: s.sigmas[s.step_index] if s.state_in_first_order else s.mid_point_sigma)
    ours = sample_dpmpp_sde(toy_denoise, start(sigmas), sigmas, noise_sampler=our_noise)
    # two noise draws per step except the last (Euler), for (sigma, sigma_mid) then (sigma, sigma')
    assert len(our_noise.calls) == 2 * (n - 1)
    assert_close(torch.tensor(our_noise.calls), torch.tensor(ref_noise.calls), 1e-6, 0, "noise queries")
    assert_close(ours, ref, RTOL, ATOL, "dpmpp_sde vs diffusers DPMSolverSDE")


def drive_vp(sched, x_vp, sigma_of, **step_kw):
    """Step a VP diffusers scheduler (model input = sample) with the toy eps model at sigma_of(sched)."""
    for t in sched.timesteps:
        sigma = sigma_of(sched, t)
        x_vp = sched.step(toy_eps(sched.scale_model_input(x_vp, t), sigma), t, x_vp, **step_kw).prev_sample
    return x_vp


@pytest.mark.parametrize("n", [5, 20])
def test_dpmpp_2m_matches_diffusers(n):
    sched = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                        solver_type="midpoint", use_karras_sigmas=True,
                                        final_sigmas_type="zero", lower_order_final=True)
    sched.set_timesteps(n)
    sched.set_begin_index(0)
    sigmas = sched.sigmas.clone()
    z = seeded_noise(seed=9)
    ref = drive_vp(sched, z.clone(), lambda s, t: s.sigmas[s.step_index or 0])
    ours = sample_dpmpp_2m(toy_denoise, z * (1 + sigmas[0] ** 2) ** 0.5, sigmas)
    assert_close(ours, ref, RTOL, ATOL, "dpmpp_2m vs diffusers")


# ----------------------------------------------------------------------------- 4. DDIM (= euler), DDPM

def table_scheduler(cls, **kw):
    """A VP diffusers scheduler given the server's alphā table: diffusers accumulates alphā in float32
    (up to ~1e-5 relative off the float64 table), which would hide the update rule's parity."""
    sched = cls(**SD_BETAS, **kw)
    sched.alphas_cumprod = SDXL_SCHEDULE.alphas_cumprod.clone()
    return sched


def table_sigma(_sched, t):
    return SDXL_SCHEDULE.sigmas[int(t)]


def test_ddim_is_euler_and_matches_diffusers_ddim():
    # DDIM eta = 0 (Song et al. 2021) is exactly Euler in sigma space; with "trailing" spacing at 10
    # steps diffusers' DDIM visits 999, 899, ..., 99 -- the `turbo` schedule's timesteps.
    sched = table_scheduler(DDIMScheduler, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == list(range(999, 0, -100))
    sigmas = calculate_sigmas("turbo", 10)
    z = seeded_noise(seed=21)
    ref = drive_vp(sched, z.clone(), table_sigma, eta=0.0)
    ours = SAMPLERS["ddim"](toy_denoise, z * (1 + sigmas[0] ** 2) ** 0.5, sigmas)
    assert_close(ours, ref, RTOL, ATOL, "ddim vs diffusers DDIM")


def test_ddpm_matches_diffusers():
    sigmas = calculate_sigmas("normal", 10)  # timesteps 999, 888, ..., 111, 0: table sigmas exactly
    timesteps = [999 - 111 * k for k in range(10)]
    # sigma(t) = exp(log table[t]): equal to the table up to the float32 exp/log round trip (2 ulp)
    assert_close(sigmas[:-1], SDXL_SCHEDULE.sigmas[timesteps], ULP2, 0, "normal-10 on the table")
    sched = table_scheduler(DDPMScheduler, clip_sample=False, variance_type="fixed_small")
    sched.set_timesteps(timesteps=timesteps)
    z = seeded_noise(seed=23)
    ref = drive_vp(sched, z.clone(), table_sigma, generator=gen(5))
    ours = sample_ddpm(toy_denoise, z * (1 + sigmas[0] ** 2) ** 0.5, sigmas, generator=gen(5))
    assert_close(ours, ref, RTOL, ATOL, "ddpm vs diffusers DDPM")


# ----------------------------------------------------------------------------- 5. LCM / TCD

LCM_7 = [999, 859, 719, 579, 439, 299, 159]  # sgm_uniform-7 on the distilled table: all on its grid


def lcm_toy_denoise(x, sigma):
    return lcm_denoised(x, sigma, toy_eps(x / (sigma**2 + 1) ** 0.5, sigma), LCM_SCHEDULE.timestep(sigma))


def test_lcm_matches_diffusers():
    sigmas = calculate_sigmas("lcm", 7)
    assert LCM_SCHEDULE.timestep(sigmas[:-1]).long().tolist() == LCM_7
    assert_close(sigmas[:-1], SDXL_SCHEDULE.sigmas[LCM_7], ULP2, 0, "lcm-7 sigmas are table sigmas")
    sched = table_scheduler(LCMScheduler)
    sched.set_timesteps(timesteps=LCM_7)
    z = seeded_noise(seed=31)
    ref = drive_vp(sched, z.clone(), table_sigma, generator=gen(8))
    ours = sample_lcm(lcm_toy_denoise, z * (1 + sigmas[0] ** 2) ** 0.5, sigmas, generator=gen(8))
    # Comfy's (and our) LCM applies c_skip to the VE input, diffusers to the VP sample; the gap
    # c_skip * |x_ve - x_vp| is < 1e-7 here (c_skip <= 0.25 / 1590^2), below float32 rounding.
    assert_close(ours, ref, RTOL, ATOL, "lcm vs diffusers LCM")


def test_lcm_denoised_scalings_match_diffusers():
    sched = LCMScheduler(**SD_BETAS)
    x, eps = seeded_noise(seed=1), seeded_noise(seed=2)
    for t in [19, 259, 999]:
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        sigma = SDXL_SCHEDULE.sigmas[t]
        expected = c_out * (x - sigma * eps) + c_skip * x
        assert_close(lcm_denoised(x, sigma, eps, torch.tensor(float(t))), expected, 1e-6, 1e-6, f"lcm t={t}")
    # reference §3.5: tau = 10 timestep, c_skip = 0.25/(tau^2+0.25), c_out = tau/sqrt(tau^2+0.25)
    tau = 190.0
    d = lcm_denoised(x, torch.tensor(0.5), eps, 19)
    assert_close(d, tau / math.sqrt(tau**2 + 0.25) * (x - 0.5 * eps) + 0.25 / (tau**2 + 0.25) * x, 1e-6, 1e-7, "lcm")


def test_tcd_matches_diffusers():
    # TCD keeps the eps parameterisation but samples on the distilled table (reference §3.5); with 7
    # steps the sgm_uniform sigmas are table sigmas, so diffusers' alphā[t] describe the same levels.
    sigmas = calculate_sigmas("tcd", 7)
    assert LCM_SCHEDULE.timestep(sigmas[:-1]).long().tolist() == LCM_7
    sched = table_scheduler(TCDScheduler)
    sched.set_timesteps(timesteps=LCM_7)
    z = seeded_noise(seed=41)
    ref = drive_vp(sched, z.clone(), table_sigma, eta=0.3, generator=gen(6))
    seen = []
    ours = sample_tcd(toy_denoise, z * (1 + sigmas[0] ** 2) ** 0.5, sigmas, generator=gen(6),
                      schedule=LCM_SCHEDULE, callback=lambda i, x, d: seen.append(d))
    # both end on the VP sample at timestep floor(0.7 * 0) = 0, not on x0 (Comfy and diffusers alike)
    assert_close(ours, ref, RTOL, ATOL, "tcd vs diffusers TCD")
    assert torch.equal(ours, seen[-1])


def reference_tcd(sigmas, x, noise, eta=0.3, schedule=LCM_SCHEDULE):
    """Comfy's sample_tcd (Zheng et al. 2024 gamma-sampling) written out in float64."""
    x = x.double()
    abar = schedule.alphas_cumprod.double()
    ts = [math.floor((1 - eta) * float(schedule.timestep(torch.tensor(s)))) for s in sigmas[:-1]] + [0]
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = toy_denoise(x, torch.tensor(s, dtype=torch.float64))
        eps = (x - d) / s
        a = float(abar[ts[i + 1]])
        x_s = math.sqrt(a) * d + math.sqrt(1 - a) * eps
        x = x_s / math.sqrt(a) + noise(s, s_next).double() * math.sqrt(s_next**2 + 1 - 1 / a) if s_next > 0 else x_s
    return x


def test_tcd_on_interpolated_sigmas_matches_written_formula():
    # sgm_uniform-4 on the distilled table lands between table entries: timesteps come from the
    # distilled timestep(sigma) = 20 * idx + 19, alphā_s from the full table.
    sigmas = calculate_sigmas("tcd", 4)
    zs = [seeded_noise(seed=60 + k) for k in range(4)]
    x0 = start(sigmas, seed=61)
    ours = sample_tcd(toy_denoise, x0.clone(), sigmas, noise_sampler=FixedNoise(zs), schedule=LCM_SCHEDULE)
    ref = reference_tcd(sigmas.tolist(), x0, FixedNoise(zs))
    assert_close(ours, ref, RTOL, ATOL, "tcd-4 vs formula")


# ----------------------------------------------------------------------------- 6. UniPC

@pytest.mark.parametrize("variant,sampler", [("bh1", sample_uni_pc), ("bh2", sample_uni_pc_bh2)])
@pytest.mark.parametrize("n", [2, 3, 10])
def test_uni_pc_matches_diffusers(variant, sampler, n):
    sigmas = calculate_sigmas("karras", n)
    comfy_sigmas = sigmas.clone()
    comfy_sigmas[-1] = 0.001  # Comfy's sample_unipc replaces a final 0 by 0.001
    # Comfy: order = min(3, steps - 1), lowered on the first and the last steps. diffusers'
    # solver_order=3 with lower_order_final gives the same per-step orders for every step count.
    sched = UniPCMultistepScheduler(**SD_BETAS, solver_order=3, solver_type=variant, predict_x0=True,
                                    lower_order_final=True, use_karras_sigmas=True)
    sched.set_timesteps(n)
    assert len(sched.timesteps) == n
    sched.sigmas = comfy_sigmas.clone()
    sched.set_begin_index(0)
    z = seeded_noise(seed=71)
    x_vp = z.clone()
    for i, t in enumerate(sched.timesteps):
        x_vp = sched.step(toy_eps(x_vp, comfy_sigmas[i]), t, x_vp).prev_sample
    ref = x_vp * (1 + 0.001**2) ** 0.5  # VP -> VE at sigma = 0.001
    calls = []
    ours = sampler(toy_denoise, z * (1 + sigmas[0] ** 2) ** 0.5, sigmas, callback=lambda i, x, d: calls.append(i))
    assert calls == list(range(n))
    # diffusers computes lambda, r_k and the rho systems in float32, we in float64.
    assert_close(ours, ref, RTOL, ATOL, f"uni_pc {variant} n={n} vs diffusers")


# ----------------------------------------------------------------------------- 7. written-out formulas

def f64(x):
    return x.double()


def d64(x, s):
    return toy_denoise(x, torch.tensor(s, dtype=torch.float64))


def reference_heunpp2(sigmas, x):
    """Comfy's sample_heunpp2 (Heun++ from sd-webui-samplers-scheduler), float64."""
    x, s = f64(x), sigmas
    for i in range(len(s) - 1):
        d = (x - d64(x, s[i])) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == s[-1]:
            x = x + d * dt
            continue
        x2 = x + d * dt
        d2 = (x2 - d64(x2, s[i + 1])) / s[i + 1]
        if s[i + 2] == s[-1]:
            w2 = s[i + 1] / (2 * s[0])
            x = x + ((1 - w2) * d + w2 * d2) * dt
        else:
            x3 = x2 + d2 * (s[i + 2] - s[i + 1])
            d3 = (x3 - d64(x3, s[i + 2])) / s[i + 2]
            w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
            x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * dt
    return x


@pytest.mark.parametrize("n", [3, 12])
def test_heunpp2_matches_written_formula(n):
    sigmas = calculate_sigmas("karras", n)
    ours = sample_heunpp2(toy_denoise, start(sigmas), sigmas)
    assert_close(ours, reference_heunpp2(sigmas.tolist(), start(sigmas)), RTOL, ATOL, "heunpp2")


def ancestral64(s, s_next):
    up = min(s_next, math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return math.sqrt(s_next**2 - up**2), up


def reference_dpmpp_2s_ancestral(sigmas, x, noise):
    """DPM-Solver++(2S) ancestral (k-diffusion), float64: midpoint in lambda, eta = 1."""
    x = f64(x)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = d64(x, s)
        down, up = ancestral64(s, s_next)
        if down == 0:
            x = d
        else:
            h = math.log(s) - math.log(down)
            s_mid = math.exp(-(-math.log(s) + h / 2))
            x2 = (s_mid / s) * x + (1 - math.exp(-h / 2)) * d
            x = (down / s) * x + (1 - math.exp(-h)) * d64(x2, s_mid)
        if s_next > 0:
            x = x + up * noise(s, s_next).double()
    return x


@pytest.mark.parametrize("n", [4, 15])
def test_dpmpp_2s_ancestral_matches_written_formula(n):
    sigmas = calculate_sigmas("karras", n)
    zs = [seeded_noise(seed=80 + k) for k in range(n)]
    ours = sample_dpmpp_2s_ancestral(toy_denoise, start(sigmas), sigmas, noise_sampler=FixedNoise(zs))
    ref = reference_dpmpp_2s_ancestral(sigmas.tolist(), start(sigmas), FixedNoise(zs))
    assert_close(ours, ref, RTOL, ATOL, "dpmpp_2s_ancestral")
    # and through the generator convention: noise i = the i-th randn of the generator
    g = gen(99)
    zs_g = [torch.randn(zs[0].shape, generator=g) for _ in range(n - 1)]
    ours_g = sample_dpmpp_2s_ancestral(toy_denoise, start(sigmas), sigmas, generator=gen(99))
    ref_g = reference_dpmpp_2s_ancestral(sigmas.tolist(), start(sigmas), FixedNoise(zs_g))
    assert_close(ours_g, ref_g, RTOL, ATOL, "dpmpp_2s_ancestral (generator)")


def reference_dpmpp_3m_sde(sigmas, x, noise):
    """DPM-Solver++(3M) SDE, eta = 1, exactly as reference §3.6 writes it, float64."""
    x = f64(x)
    hist_d, hist_h = [], []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = d64(x, s)
        if s_next == 0:
            x = d
            h = None
        else:
            h = math.log(s) - math.log(s_next)
            he = 2 * h
            x = (s_next / s) ** 2 * x + (1 - math.exp(-he)) * d
            phi2 = (math.exp(-he) - 1) / he + 1
            phi3 = phi2 / he - 0.5
            if len(hist_d) >= 2 and hist_h[-2] is not None:
                r0, r1 = hist_h[-1] / h, hist_h[-2] / h
                d1_0 = (d - hist_d[-1]) / r0
                d1_1 = (hist_d[-1] - hist_d[-2]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi2 * d1 - phi3 * d2
            elif len(hist_d) >= 1:
                x = x + phi2 * (d - hist_d[-1]) / (hist_h[-1] / h)
            x = x + s_next * math.sqrt(1 - math.exp(-2 * h)) * noise(s, s_next).double()
        hist_d.append(d)
        hist_h.append(h)
    return x


@pytest.mark.parametrize("scheduler,n", [("karras", 3), ("karras", 20), ("exponential", 9)])
def test_dpmpp_3m_sde_matches_written_formula(scheduler, n):
    sigmas = calculate_sigmas(scheduler, n)
    x = start(sigmas, seed=13)
    smin, smax = float(sigmas[sigmas > 0].min()), float(sigmas.max())
    ours = sample_dpmpp_3m_sde(toy_denoise, x.clone(), sigmas, noise_sampler=BrownianTreeNoise(x, smin, smax, 42))
    ref = reference_dpmpp_3m_sde(sigmas.tolist(), x, BrownianTreeNoise(x, smin, smax, 42))
    assert_close(ours, ref, RTOL, ATOL, f"3m_sde {scheduler}-{n}")
    # diffusers' sde-dpmsolver++ 3rd order is NOT this formula (its D2 coefficient is
    # (1 - e^{-2h} - 2h)/(2h)^2 - 1/2, k-diffusion's -phi3 = ... + 1/2), hence the written formula.


# --- DPM-Solver (dpm_fast / dpm_adaptive), written from Lu et al. 2022 in float64 (VE, alpha = 1)

def dpms_eps(x, lam):
    s = math.exp(-lam)
    return (x - d64(x, s)) / s


def dpms_step(x, lam, lam_next, order, r1=None):
    """DPM-Solver-1/2/3 (paper eqs. 3.6 / Algorithms 1-2; r1 = 1/2 for order 2, 1/3 & 2/3 for order 3)."""
    h = lam_next - lam
    sig = lambda l: math.exp(-l)
    e0 = dpms_eps(x, lam)
    if order == 1:
        return x - sig(lam_next) * math.expm1(h) * e0
    if order == 2:
        r1 = 0.5 if r1 is None else r1
        u1 = x - sig(lam + r1 * h) * math.expm1(r1 * h) * e0
        e1 = dpms_eps(u1, lam + r1 * h)
        return x - sig(lam_next) * math.expm1(h) * e0 - sig(lam_next) / (2 * r1) * math.expm1(h) * (e1 - e0)
    r1, r2 = 1 / 3, 2 / 3
    u1 = x - sig(lam + r1 * h) * math.expm1(r1 * h) * e0
    e1 = dpms_eps(u1, lam + r1 * h)
    u2 = (x - sig(lam + r2 * h) * math.expm1(r2 * h) * e0
          - sig(lam + r2 * h) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e0))
    e2 = dpms_eps(u2, lam + r2 * h)
    return x - sig(lam_next) * math.expm1(h) * e0 - sig(lam_next) / r2 * (math.expm1(h) / h - 1) * (e2 - e0)


@pytest.mark.parametrize("nfe,orders", [(6, [3, 2, 1]), (10, [3, 3, 3, 1]), (20, [3] * 6 + [2])])
def test_dpm_fast_matches_written_formula(nfe, orders):
    # Lu et al. 2022 Sec. 3.4: K = nfe // 3 + 1 steps, order 3 except the tail
    assert dpm_fast_orders(nfe) == orders
    sigmas = calculate_sigmas("karras", nfe)
    x = start(sigmas, seed=17)
    calls = []
    ours = sample_dpm_fast(toy_denoise, x.clone(), sigmas, callback=lambda i, xi, d: calls.append(i))
    assert calls == list(range(len(orders)))  # one callback per DPM-Solver step, not per NFE
    # it runs from sigmas[0] to sigmas[-2] (the last non-zero sigma), uniform in lambda
    lam0, lam1 = -math.log(float(sigmas[0])), -math.log(float(sigmas[-2]))
    lams = np.linspace(lam0, lam1, len(orders) + 1)
    ref = f64(x)
    for k, order in enumerate(orders):
        ref = dpms_step(ref, lams[k], lams[k + 1], order)
    assert_close(ours, ref, RTOL, ATOL, f"dpm_fast nfe={nfe}")


def gaussian_denoise(x, sigma):
    """Exact denoiser for unit-Gaussian data: D = x / (1 + sigma^2); the PF-ODE solution is
    x(sigma) = x_T sqrt(1 + sigma^2) / sqrt(1 + sigma_T^2)."""
    return x / (1 + sigma**2)


def test_dpm_fast_and_adaptive_solve_the_ode():
    sigmas = calculate_sigmas("karras", 30)
    s0, s_end = float(sigmas[0]), float(sigmas[-2])
    x = start(sigmas, seed=19)
    exact = f64(x) * math.sqrt(1 + s_end**2) / math.sqrt(1 + s0**2)
    fast = sample_dpm_fast(gaussian_denoise, x.clone(), sigmas)
    # 10 steps of 3rd order over 6.2 units of lambda: relative error well below 1e-3
    assert_close(fast, exact, 1e-3, 1e-4, "dpm_fast vs exact ODE solution")
    calls = []
    adaptive = sample_dpm_adaptive(gaussian_denoise, x.clone(), sigmas, callback=lambda i, xi, d: calls.append(i))
    # error control with rtol = 0.05, atol = 0.0078 per step (accumulated over the accepted steps)
    assert_close(adaptive, exact, 0.05, 0.0078 * 4, "dpm_adaptive vs exact ODE solution")
    assert calls == list(range(len(calls))) and 3 <= len(calls) < 200


def reference_dpm_adaptive(sigmas, x, rtol=0.05, atol=0.0078, h=0.05):
    """DPM-Solver-23 with the integral step-size controller (Lu et al. 2022 Algorithm 5 with
    k-diffusion's constants: factor = 1 + atan(err^-1/3 - 1), accept if factor >= 0.81), float64."""
    x = f64(x)
    lam, lam_end = -math.log(sigmas[0]), -math.log(sigmas[-2] if sigmas[-1] == 0 else sigmas[-1])
    x_prev = x
    while lam < lam_end - 1e-5:
        lam_next = min(lam_end, lam + h)
        x_low = dpms_step(x, lam, lam_next, 2, r1=1 / 3)
        x_high = dpms_step(x, lam, lam_next, 3)
        delta = torch.maximum(torch.tensor(atol, dtype=torch.float64), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        err = float(torch.linalg.norm((x_low - x_high) / delta)) / x.numel() ** 0.5
        factor = 1 + math.atan((1 / (err + 1e-8)) ** (1 / 3) - 1)
        if factor >= 0.81:
            x_prev, x, lam = x_low, x_high, lam_next
        h *= factor
    return x


def test_dpm_adaptive_matches_written_formula():
    sigmas = calculate_sigmas("karras", 10)
    x = start(sigmas, seed=29)
    ours = sample_dpm_adaptive(toy_denoise, x.clone(), sigmas)
    ref = reference_dpm_adaptive(sigmas.tolist(), x)
    # same accept/reject sequence in float32 and float64 (checked by the tight match)
    assert_close(ours, ref, RTOL, ATOL, "dpm_adaptive vs formula")


# --- Restart

def reference_restart(pairs, x, noise):
    """Restart sampling (Xu et al. 2023): Heun along the pairs, re-noise on every upward jump."""
    x, last = f64(x), None
    for a, b in pairs:
        if last is not None and last < a:
            x = x + noise(last, a).double() * math.sqrt(a**2 - last**2)
        d = (x - d64(x, a)) / a
        if b == 0:
            x = x + d * (b - a)
        else:
            x2 = x + d * (b - a)
            x = x + (d + (x2 - d64(x2, b)) / b) / 2 * (b - a)
        last = b
    return x


def test_restart_step_list_is_comfys_default():
    # 30 steps: karras-21 main schedule over [sigmas[-2], sigmas[0]]; after the sigma nearest 0.1,
    # 9 Heun steps back down a karras-10 ramp from the sigma nearest 2 (one restart).
    sigmas = calculate_sigmas("normal", 30)
    pairs = [(float(a), float(b)) for a, b in restart_step_list(sigmas)]
    main = karras_sigmas(21, float(sigmas[-2]), float(sigmas[0]))
    i_min = int(torch.argmin((main - 0.1).abs()))
    i_max = int(torch.argmin((main - 2.0).abs()))
    ramp = karras_sigmas(10, float(main[i_min]), float(main[i_max]))[:-1]
    expected = ([(float(main[k]), float(main[k + 1])) for k in range(i_min)]
                + [(float(ramp[k]), float(ramp[k + 1])) for k in range(9)]
                + [(float(main[k]), float(main[k + 1])) for k in range(i_min, 21)])
    assert pairs == expected and len(pairs) == 30
    ups = [k for k in range(1, 30) if pairs[k][0] > pairs[k - 1][1]]
    assert len(ups) == 1  # one upward jump: main[i_min] -> ramp[0] ~ 2
    # 40 steps: K = 10, two restarts
    pairs40 = restart_step_list(calculate_sigmas("karras", 40))
    assert len(pairs40) == 40
    assert sum(1 for k in range(1, 40) if pairs40[k][0] > pairs40[k - 1][1]) == 2


def test_restart_matches_written_formula_and_is_heun_below_20_steps():
    sigmas = calculate_sigmas("karras", 24)
    pairs = [(float(a), float(b)) for a, b in restart_step_list(sigmas)]
    zs = [seeded_noise(seed=90 + k) for k in range(3)]
    calls = []
    ours = sample_restart(toy_denoise, start(sigmas), sigmas, noise_sampler=FixedNoise(zs),
                          callback=lambda i, x, d: calls.append(i))
    assert calls == list(range(24))
    assert_close(ours, reference_restart(pairs, start(sigmas), FixedNoise(zs)), RTOL, ATOL, "restart")
    short = calculate_sigmas("karras", 12)
    assert torch.equal(sample_restart(toy_denoise, start(short), short, generator=gen(1)),
                       sample_heun(toy_denoise, start(short), short))


# ----------------------------------------------------------------------------- 8. smoke: fixed x0

X0 = seeded_noise(seed=4242) * 0.8


def fixed_x0(x, sigma):
    return X0.clone()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_lands_on_a_fixed_x0(name):
    """With D = x0 everywhere the PF-ODE solution is x0 + (sigma / sigma_0)(x_T - x0): first-order
    and exponential integrators are exact on it, so deterministic samplers must land on it at their
    final sigma; stochastic ones collapse to D on their last step (tcd: to the VP sample at t = 0)."""
    scheduler = "tcd" if name == "tcd" else "karras"
    sampler_sigmas = calculate_sigmas(scheduler, 12, sampler=name)
    x_t = start(sampler_sigmas, seed=4343)
    kw = {}
    if name in SDE_SAMPLERS:
        pos = sampler_sigmas[sampler_sigmas > 0]
        kw["noise_sampler"] = BrownianTreeNoise(x_t, float(pos.min()), float(pos.max()), 1)
    elif name in ANCESTRAL_SAMPLERS:
        kw["generator"] = gen(2)
    if name == "tcd":
        kw["schedule"] = LCM_SCHEDULE
    seen = []
    out = SAMPLERS[name](fixed_x0, x_t.clone(), sampler_sigmas, callback=lambda i, x, d: seen.append((x, d)), **kw)
    assert torch.isfinite(out).all() and seen, name
    sigma_end = {"dpm_fast": float(sampler_sigmas[-2]), "dpm_adaptive": float(sampler_sigmas[-2]),
                 "uni_pc": 0.001, "uni_pc_bh2": 0.001}.get(name, 0.0)
    if name == "tcd":
        x_last, sigma_last = seen[-1][0], float(sampler_sigmas[-2])
        abar0 = float(SDXL_SCHEDULE.alphas_cumprod[0])
        expected = math.sqrt(abar0) * X0 + math.sqrt(1 - abar0) * (x_last - X0) / sigma_last
    elif name in DETERMINISTIC_SAMPLERS:
        expected = X0 + sigma_end / float(sampler_sigmas[0]) * (x_t - X0)
    else:
        expected = X0
    # float32 arithmetic on |x_T| ~ 45: atol 1e-4
    assert_close(out, expected, 1e-5, 1e-4, f"{name} with a fixed x0")


# ----------------------------------------------------------------------------- 9. schedules

def test_exponential_matches_formula():
    for n in (4, 30):
        smin, smax = SDXL_SCHEDULE.sigma_min, SDXL_SCHEDULE.sigma_max
        expected = [math.exp(math.log(smax) + k / (n - 1) * (math.log(smin) - math.log(smax))) for k in range(n)]
        assert_close(calculate_sigmas("exponential", n), expected + [0.0], 1e-5, 1e-7, f"exponential-{n}")


def test_simple_matches_reference_formula():
    table = sdxl_sigma_table_f64()
    for n in (1, 4, 10, 30, 50):
        expected = [table[999 - (k * 1000) // n] for k in range(n)] + [0.0]
        assert_close(calculate_sigmas("simple", n), expected, 1e-6, 0, f"simple-{n}")
    # For a few n Fooocus's float stride int(k * (1000 / n)) is one below floor(k * 1000 / n):
    # 19 * (1000 / 38) = 499.99999999999994. We compute it as Fooocus does (index 999 - 499).
    assert float(calculate_sigmas("simple", 38)[19]) == float(SDXL_SCHEDULE.sigmas[999 - 499])


def test_ddim_uniform_matches_reference():
    sigmas = calculate_sigmas("ddim_uniform", 30)
    assert len(sigmas) == 32  # reference §3.5: n = 30 gives 31 steps (+ the final 0)
    assert_close(sigmas, SDXL_SCHEDULE.sigmas[list(range(1, 1000, 33))[::-1]].tolist() + [0.0], 0, 0, "ddim_uniform-30")
    sigmas = calculate_sigmas("ddim_uniform", 10)
    assert_close(sigmas, SDXL_SCHEDULE.sigmas[[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]].tolist() + [0.0],
                 0, 0, "ddim_uniform-10")
    # a partial denoise still takes the steps + 1 tail
    assert len(calculate_sigmas("ddim_uniform", 30, denoise=0.5)) == 31


def test_turbo_matches_reference():
    sigmas = calculate_sigmas("turbo", 4)
    for a, b in zip(sigmas.tolist(), [14.6146, 8.3028, 5.0878, 3.3211, 0.0]):  # reference §3.5, 4 decimals
        assert abs(a - b) <= 5.1e-5
    full = calculate_sigmas("turbo", 10)
    assert_close(full, SDXL_SCHEDULE.sigmas[list(range(999, 0, -100))].tolist() + [0.0], ULP2, 0, "turbo-10")
    assert torch.equal(calculate_sigmas("turbo", 14), full)  # SD-Turbo has 10 timesteps at most


def test_align_your_steps_matches_reference():
    ten = calculate_sigmas("align_your_steps", 10)
    assert_close(ten, AYS_SDXL_NOISE_LEVELS[:-1] + [0.0], 1e-7, 0, "AYS-10 = the published levels")
    thirty = calculate_sigmas("align_your_steps", 30)
    assert len(thirty) == 31 and float(thirty[-1]) == 0.0
    # 31 log-linear points over 11 levels: every third point is a published level
    assert_close(thirty[0:30:3], AYS_SDXL_NOISE_LEVELS[:10], 1e-6, 0, "AYS-30 knots")
    # and in between, log-linear: log s_{3k+1} = (2 log L_k + log L_{k+1}) / 3
    logs = np.log(AYS_SDXL_NOISE_LEVELS)
    assert_close(thirty[1:30:3], np.exp((2 * logs[:10] + logs[1:11]) / 3), 1e-6, 0, "AYS-30 between knots")
    four = calculate_sigmas("align_your_steps", 4)
    grid = np.interp(np.linspace(0, 1, 5), np.linspace(0, 1, 11), logs[::-1])
    assert_close(four[:-1], np.exp(grid[::-1])[:-1], 1e-6, 0, "AYS-4")


def test_lcm_distilled_table_and_extreme_speed_sigmas():
    # 50 sigmas at original indices 19, 39, ..., 999; timestep(sigma) = 20 idx + 19
    assert_close(LCM_SCHEDULE.sigmas, SDXL_SCHEDULE.sigmas[19::20], 0, 0, "distilled table")
    assert len(LCM_SCHEDULE.sigmas) == 50
    assert LCM_SCHEDULE.timestep(LCM_SCHEDULE.sigmas).long().tolist() == list(range(19, 1000, 20))
    assert_close(LCM_SCHEDULE.sigma(torch.tensor([19.0, 999.0, 509.0])),
                 [float(SDXL_SCHEDULE.sigmas[19]), float(SDXL_SCHEDULE.sigmas[999]),
                  math.sqrt(float(SDXL_SCHEDULE.sigmas[499]) * float(SDXL_SCHEDULE.sigmas[519]))], 1e-6, 0, "sigma(t)")
    ref = [14.6146, 7.3918, 4.1708, 2.5629, 1.6679, 1.1139, 0.7325, 0.4367, 0.0]  # reference §3.5
    for name in ("lcm", "tcd"):
        ours = calculate_sigmas(name, 8)
        assert len(ours) == 9
        for a, b in zip(ours.tolist(), ref):
            assert abs(a - b) <= 5.1e-5, (name, a, b)
    # the formula: sgm_uniform on the distilled table, linspace(999, 19, n + 1)[:-1] -> sigma(t)
    t = np.linspace(999, 19, 9)[:-1]
    idx = (t - 19) / 20
    logs = np.log(sdxl_sigma_table_f64()[19::20])
    expected = np.exp(np.interp(idx, np.arange(50), logs))
    assert_close(calculate_sigmas("lcm", 8)[:-1], expected, 1e-5, 0, "lcm-8 formula")


def test_edm_playground_schedule_and_parameterisation():
    sigmas = calculate_sigmas("edm_playground_v2.5", 12)
    assert abs(float(sigmas[0]) - 120.0) <= 1e-4 and abs(float(sigmas[-2]) - 0.002) <= 1e-8
    smin, smax = EDM_PLAYGROUND_SCHEDULE.sigma_min, EDM_PLAYGROUND_SCHEDULE.sigma_max
    a, b = smax ** (1 / 7), smin ** (1 / 7)
    assert_close(sigmas, [(a + k / 11 * (b - a)) ** 7 for k in range(12)] + [0.0], 1e-5, 1e-8, "edm karras")
    assert model_sampling_for("edm_playground_v2.5") == (EDM_PLAYGROUND_SCHEDULE, "edm")
    assert model_sampling_for("lcm") == (LCM_SCHEDULE, "lcm")
    assert model_sampling_for("tcd") == (LCM_SCHEDULE, "eps")
    assert model_sampling_for("karras") == (SDXL_SCHEDULE, "eps")
    assert_close(EDM_PLAYGROUND_SCHEDULE.timestep(torch.tensor(120.0)), 0.25 * math.log(120.0), 1e-6, 0, "t(sigma)")
    # Karras et al. 2022 Table 1: c_skip = sd^2/(s^2+sd^2), c_out = s sd / sqrt(s^2 + sd^2)
    x, f = seeded_noise(seed=3), seeded_noise(seed=4)
    for s in (0.002, 1.0, 120.0):
        c_skip, c_out = 0.25 / (s * s + 0.25), s * 0.5 / math.sqrt(s * s + 0.25)
        assert_close(edm_denoised(x, torch.tensor(s), f), c_skip * x + c_out * f, 1e-6, 1e-6, f"edm s={s}")


@pytest.mark.parametrize("steps,denoise,first", [(30, 0.5, 1.2124), (30, 0.85, 7.7548), (18, 0.382, 0.569)])
def test_partial_denoise_tails_match_reference(steps, denoise, first):
    sigmas = calculate_sigmas("karras", steps, denoise=denoise)
    assert len(sigmas) == steps + 1
    assert abs(float(sigmas[0]) - first) <= 5.1e-5  # reference §3.5 (Vary Subtle / Strong, Upscale)


@pytest.mark.parametrize("sampler", sorted(DISCARD_PENULTIMATE_SIGMA_SAMPLERS))
def test_discard_penultimate_sigma(sampler):
    plain = calculate_sigmas("karras", 6)
    longer = calculate_sigmas("karras", 7)
    ours = calculate_sigmas("karras", 6, sampler=sampler)
    assert torch.equal(ours, torch.cat([longer[:-2], longer[-1:]])) and len(ours) == len(plain)
    # partial denoise: drop on the int(steps/d)+1 schedule, then take the tail (Comfy's order)
    part = calculate_sigmas("karras", 6, denoise=0.5, sampler=sampler)
    full13 = calculate_sigmas("karras", 13)
    assert torch.equal(part, torch.cat([full13[:-2], full13[-1:]])[-7:])
    assert torch.equal(calculate_sigmas("karras", 6, sampler="euler"), plain)


def test_unknown_scheduler_and_bad_arguments():
    from pipeline.errors import UnsupportedFeature

    with pytest.raises(UnsupportedFeature):
        calculate_sigmas("beta", 10)
    with pytest.raises(ValueError):
        calculate_sigmas("karras", 0)
    with pytest.raises(ValueError):
        calculate_sigmas("karras", 10, denoise=0.0)


def test_normal_and_sgm_uniform_on_the_sdxl_table_unchanged():
    # the generalised t_max/t_min keep SDXL's 999 -> 0 (regression guard for test_sampler_math)
    for n in (4, 9):
        expected = np.concatenate([loglinear_sigma_f64(np.linspace(999, 0, n)), [0.0]])
        assert_close(calculate_sigmas("normal", n), expected, 1e-5, 1e-7, f"normal-{n}")
