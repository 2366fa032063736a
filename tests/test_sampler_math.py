"""Sigma schedules and samplers against independent references, on a toy denoiser.

References used:
  * the formulas themselves, written out here (Karras et al. 2022 eq. 5; the SDXL discrete
    schedule in float64; k-diffusion's DPM-Solver++(2M) SDE midpoint update),
  * the numbers published in /work/shared/reference/fooocus_semantics.md §3.5,
  * diffusers' EulerDiscreteScheduler and DPMSolverMultistepScheduler (VP space, stepped by hand).

The toy model is deterministic and nonlinear; the denoiser is built from it exactly as the
server's EPS model wrapper does: D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), sigma).
No Triton, ONNX or network; the whole file runs in a few seconds on CPU.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.samplers import BrownianTreeNoise, sample_dpmpp_2m_sde, sample_euler
from pipeline.schedules import (
    SDXL_SCHEDULE,
    calculate_sigmas,
    karras_sigmas,
    normal_sigmas,
    sgm_uniform_sigmas,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler  # noqa: E402

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ----------------------------------------------------------------------------- helpers

def sdxl_sigma_table_f64() -> np.ndarray:
    """SDXL's 1000 training sigmas, computed here independently in float64."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def karras_formula(n: int, smin: float, smax: float) -> list[float]:
    """Karras et al. 2022 eq. 5 (rho = 7), in float64, plus the trailing 0."""
    a, b = smax ** (1 / 7), smin ** (1 / 7)
    return [(a + k / (n - 1) * (b - a)) ** 7 for k in range(n)] + [0.0]


def toy_eps(xs: torch.Tensor, sigma) -> torch.Tensor:
    """Deterministic, nonlinear stand-in for the UNet's epsilon prediction.

    The first term is the exact epsilon for unit-Gaussian data (D = x / (1 + sigma^2)); the
    bounded nonlinear terms on top keep D nonlinear in x and sigma while the sampling stays
    stable (an unbounded xs**2 term alone makes every sampler run away to ~1e6 on the way
    down, which tests float32 cancellation rather than the samplers)."""
    return (xs * sigma / (1 + sigma**2) ** 0.5 + 0.3 * torch.tanh(0.7 * xs + 0.1 * sigma)
            + 0.05 * xs**2 / (1 + 0.1 * xs**2))


def toy_denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """k-diffusion VE denoiser from the epsilon model (the server's EPS wrapper)."""
    return x - sigma * toy_eps(x / (sigma**2 + 1) ** 0.5, sigma)


def seeded_noise(shape=(1, 4, 8, 8), seed: int = 1234) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def assert_close(actual, expected, rtol, atol, msg=""):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


# ----------------------------------------------------------------------------- 1. karras

def test_sdxl_sigma_range_matches_reference():
    # Reference §3.5: sigma_min = 0.0291672, sigma_max = 14.614641 (float32 values, printed
    # to 6-7 significant digits): tolerance half a unit of the last printed digit.
    assert abs(SDXL_SCHEDULE.sigma_min - 0.0291672) <= 5e-8
    assert abs(SDXL_SCHEDULE.sigma_max - 14.614641) <= 5e-7
    # The whole table equals the float64 computation cast to float32 (rtol 1e-6 ~ 8 ulp).
    assert_close(SDXL_SCHEDULE.sigmas, sdxl_sigma_table_f64(), rtol=1e-6, atol=0, msg="sigma table")


@pytest.mark.parametrize("n", [4, 30])
def test_karras_equals_formula(n):
    smin, smax = SDXL_SCHEDULE.sigma_min, SDXL_SCHEDULE.sigma_max
    ours = karras_sigmas(n, smin, smax)
    assert ours.shape == (n + 1,)
    assert float(ours[-1]) == 0.0
    # float32 implementation vs float64 formula: rtol 1e-5, atol 1e-7.
    assert_close(ours, karras_formula(n, smin, smax), rtol=1e-5, atol=1e-7, msg=f"karras n={n}")


KARRAS_30_REF = [14.6146, 12.6606, 10.9349, 9.4149, 8.0797, 6.9102, 5.889, 4.9999, 4.2284,
                 3.5613, 2.9866, 2.4932, 2.0714, 1.7124, 1.408, 1.1513, 0.9357, 0.7558, 0.6063,
                 0.4829, 0.3817, 0.2993, 0.2326, 0.1791, 0.1365, 0.1029, 0.0766, 0.0564, 0.0409,
                 0.0292, 0.0]
KARRAS_4_REF = [14.6146, 3.1686, 0.4469, 0.0292, 0.0]


@pytest.mark.parametrize("n,ref", [(30, KARRAS_30_REF), (4, KARRAS_4_REF)])
def test_karras_matches_published_values(n, ref):
    ours = calculate_sigmas("karras", n)
    assert len(ours) == len(ref)
    # Reference values are rounded to 4 decimals: |ours - ref| <= 5e-5 (+1e-6 slack for float32).
    for i, (a, b) in enumerate(zip(ours.tolist(), ref)):
        assert abs(a - b) <= 5.1e-5, f"karras-{n}[{i}]: ours {a:.6f} vs reference {b}"


@pytest.mark.parametrize("n", [4, 10, 30])
@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_karras_matches_diffusers(cls, n):
    sched = cls(**SD_BETAS, use_karras_sigmas=True, final_sigmas_type="zero")
    sched.set_timesteps(n)
    ours = calculate_sigmas("karras", n)
    # diffusers computes in float64 from the float64 table, then casts to float32: rtol 1e-5.
    assert_close(ours, sched.sigmas, rtol=1e-5, atol=1e-7, msg=f"{cls.__name__} karras n={n}")


# ----------------------------------------------------------------------------- 2. sgm_uniform / normal

def test_sgm_uniform_lightning_4_steps():
    ours = sgm_uniform_sigmas(4)
    ref = [14.6146, 4.0861, 1.6156, 0.6951, 0.0]  # reference §3.5, 4 decimals
    assert len(ours) == 5
    for i, (a, b) in enumerate(zip(ours.tolist(), ref)):
        assert abs(a - b) <= 5.1e-5, f"sgm_uniform-4[{i}]: ours {a:.6f} vs reference {b}"
    # and calculate_sigmas routes to it
    assert torch.equal(calculate_sigmas("sgm_uniform", 4), ours)


def loglinear_sigma_f64(t: np.ndarray) -> np.ndarray:
    table = np.log(sdxl_sigma_table_f64())
    lo, hi = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - lo
    return np.exp((1 - w) * table[lo] + w * table[hi])


@pytest.mark.parametrize("n", [4, 9, 30])
def test_normal_matches_formula(n):
    ours = normal_sigmas(n)
    expected = np.concatenate([loglinear_sigma_f64(np.linspace(999, 0, n)), [0.0]])
    # float32 log-table vs float64: rtol 1e-5.
    assert_close(ours, expected, rtol=1e-5, atol=1e-7, msg=f"normal n={n}")


@pytest.mark.parametrize("n", [5, 8])
def test_sgm_uniform_matches_formula(n):
    expected = np.concatenate([loglinear_sigma_f64(np.linspace(999, 0, n + 1)[:-1]), [0.0]])
    assert_close(sgm_uniform_sigmas(n), expected, rtol=1e-5, atol=1e-7, msg=f"sgm_uniform n={n}")


# ----------------------------------------------------------------------------- 3. timestep(sigma)

def test_timestep_of_table_sigma_is_its_index():
    ts = [0, 1, 2, 10, 100, 250, 500, 777, 998, 999]
    sig = SDXL_SCHEDULE.sigmas[ts]
    out = SDXL_SCHEDULE.timestep(sig)
    assert out.tolist() == [float(t) for t in ts]  # exact
    # a scalar input keeps its (0-d) shape
    assert float(SDXL_SCHEDULE.timestep(SDXL_SCHEDULE.sigmas[321])) == 321.0


def test_timestep_is_integer_nearest_in_log_sigma():
    sigmas = calculate_sigmas("karras", 30)[:-1]
    out = SDXL_SCHEDULE.timestep(sigmas)
    assert torch.equal(out, out.round()), "timesteps must be integers"
    table = np.log(sdxl_sigma_table_f64())
    for s, t in zip(sigmas.tolist(), out.tolist()):
        d = np.abs(np.log(s) - table)
        # nearest index in log-sigma (ties within 1e-6 accepted)
        assert d[int(t)] <= d.min() + 1e-6, (s, t, int(np.argmin(d)))
    # diffusers' DPM-Solver rounds its interpolated karras timesteps; same integers.
    sched = DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True, final_sigmas_type="zero")
    sched.set_timesteps(30)
    assert out.long().tolist() == sched.timesteps.tolist()


# ----------------------------------------------------------------------------- 4. euler

@pytest.mark.parametrize("n", [10, 25])
def test_euler_matches_diffusers(n):
    sigmas = calculate_sigmas("karras", n)
    z = seeded_noise()

    # timestep_spacing only selects init_noise_sigma here (custom sigmas fix the schedule):
    # "leading" gives sqrt(sigma_max^2 + 1), the k-diffusion/Fooocus txt2img start.
    sched = EulerDiscreteScheduler(**SD_BETAS, prediction_type="epsilon", timestep_spacing="leading")
    sched.set_timesteps(sigmas=sigmas.tolist())
    sched.set_begin_index(0)
    assert_close(sched.sigmas, sigmas, rtol=0, atol=0, msg="diffusers got our sigmas")
    ours_start = z * (1 + sigmas[0] ** 2) ** 0.5
    assert abs(float(sched.init_noise_sigma) - float((1 + sigmas[0] ** 2) ** 0.5)) <= 1e-6
    assert abs(float((1 + sigmas[0] ** 2) ** 0.5) - 14.6488) <= 5e-5  # reference §3.5: ·14.6488

    x = z * sched.init_noise_sigma
    ref_states = []
    for i, t in enumerate(sched.timesteps):
        ref_states.append(x.clone())
        model_output = toy_eps(sched.scale_model_input(x, t), sched.sigmas[i])
        x = sched.step(model_output, t, x).prev_sample
    ref_final = x

    our_states = []
    ours = sample_euler(toy_denoise, ours_start.clone(), sigmas,
                        callback=lambda i, xi, d: our_states.append(xi.clone()))
    assert len(our_states) == n
    # float32 on both sides: rtol 1e-5, atol 1e-4 (states start at |x| ~ 40).
    for i, (a, b) in enumerate(zip(our_states, ref_states)):
        assert_close(a, b, rtol=1e-5, atol=1e-4, msg=f"euler state before step {i}")
    assert_close(ours, ref_final, rtol=1e-5, atol=1e-4, msg="euler final")
    assert ours.abs().max() < 10  # sanity: it actually denoised


# ----------------------------------------------------------------------------- 5. dpmpp_2m_sde

class FixedNoise:
    """noise_sampler returning precomputed z_i for the i-th call; records the (sigma, sigma') asked."""

    def __init__(self, zs):
        self.zs, self.calls = zs, []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.zs[len(self.calls) - 1]


@pytest.mark.parametrize("n", [10, 20])
def test_dpmpp_2m_sde_matches_diffusers(n):
    z0 = seeded_noise(seed=7)
    zs = [seeded_noise(seed=100 + i) for i in range(n)]

    sched = DPMSolverMultistepScheduler(
        **SD_BETAS, algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint",
        use_karras_sigmas=True, final_sigmas_type="zero", prediction_type="epsilon",
    )
    sched.set_timesteps(n)
    sched.set_begin_index(0)
    sigmas = calculate_sigmas("karras", n)
    assert_close(sched.sigmas, sigmas, rtol=1e-5, atol=1e-7, msg="diffusers karras sigmas")
    assert float(sched.init_noise_sigma) == 1.0

    # diffusers runs in VP space: x_vp = x_ve / sqrt(1 + sigma^2); x0 predictions are identical.
    x = z0 * sched.init_noise_sigma
    ref_states, ref_x0 = [], []
    for i, t in enumerate(sched.timesteps):
        s = sched.sigmas[i]
        ref_states.append(x.clone() * (1 + s**2) ** 0.5)  # back to VE
        xin = sched.scale_model_input(x, t)
        model_output = toy_eps(xin, s)
        # diffusers' own x0: (x_vp - sigma_vp * eps) / alpha, alpha = 1/sqrt(1+s^2), sigma_vp = s * alpha
        alpha = 1 / (1 + s**2) ** 0.5
        ref_x0.append((xin - s * alpha * model_output) / alpha)
        x = sched.step(model_output, t, x, variance_noise=zs[i]).prev_sample
    ref_final = x  # at sigma = 0, VP == VE

    noise = FixedNoise(zs)
    our_states, our_x0 = [], []
    ours = sample_dpmpp_2m_sde(
        toy_denoise, z0 * (1 + sigmas[0] ** 2) ** 0.5, sigmas, noise_sampler=noise,
        callback=lambda i, xi, d: (our_states.append(xi.clone()), our_x0.append(d.clone())),
    )
    # noise is drawn once per step except the last (sigma' = 0), for (sigma_i, sigma_{i+1})
    assert noise.calls == [(float(sigmas[i]), float(sigmas[i + 1])) for i in range(n - 1)]
    # float32 both sides, slightly different float32 sigmas: rtol 1e-5, atol 1e-4.
    for i in range(n):
        assert_close(our_states[i], ref_states[i], rtol=1e-5, atol=1e-4, msg=f"2m_sde state before step {i}")
        assert_close(our_x0[i], ref_x0[i], rtol=1e-5, atol=1e-4, msg=f"2m_sde x0 at step {i}")
    assert_close(ours, ref_final, rtol=1e-5, atol=1e-4, msg="2m_sde final")
    assert torch.equal(ours, our_x0[-1])  # last step returns D


def reference_dpmpp_2m_sde(sigmas: list[float], x: torch.Tensor, noise) -> torch.Tensor:
    """k-diffusion DPM-Solver++(2M) SDE, midpoint, eta = 1, s_noise = 1 (reference §3.6), float64."""
    x = x.double()
    old_d, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = toy_denoise(x, torch.tensor(s, dtype=torch.float64))
        if s_next == 0:
            x = d
        else:
            h = math.log(s) - math.log(s_next)
            x = (s_next / s) * math.exp(-h) * x + (1 - math.exp(-2 * h)) * d
            if old_d is not None:
                r = h_last / h
                x = x + 0.5 * (1 - math.exp(-2 * h)) * (1 / r) * (d - old_d)
            x = x + s_next * math.sqrt(1 - math.exp(-2 * h)) * noise(s, s_next).double()
            h_last = h
        old_d = d
    return x


@pytest.mark.parametrize("scheduler,n", [("karras", 10), ("karras", 30), ("sgm_uniform", 4), ("normal", 12)])
def test_dpmpp_2m_sde_matches_written_formula(scheduler, n):
    sigmas = calculate_sigmas(scheduler, n)
    x_start = seeded_noise(seed=11) * (1 + sigmas[0] ** 2) ** 0.5
    smin, smax = float(sigmas[sigmas > 0].min()), float(sigmas.max())
    # Real Brownian-tree noise, two trees with the same seed queried in the same order.
    ours = sample_dpmpp_2m_sde(toy_denoise, x_start.clone(), sigmas,
                               noise_sampler=BrownianTreeNoise(x_start, smin, smax, seed=42))
    ref = reference_dpmpp_2m_sde(sigmas.tolist(), x_start, BrownianTreeNoise(x_start, smin, smax, seed=42))
    # float32 implementation vs float64 formula: rtol 1e-5, atol 1e-4.
    assert_close(ours, ref, rtol=1e-5, atol=1e-4, msg=f"2m_sde vs formula, {scheduler}-{n}")


# ----------------------------------------------------------------------------- 6. Brownian tree noise

SMIN, SMAX = 0.0291672, 14.614641


def test_brownian_same_seed_same_noise_different_seed_differs():
    x = torch.zeros(1, 4, 16, 16)
    queries = [(14.614641, 6.9), (6.9, 1.2), (1.2, 0.0291672)]
    a = [BrownianTreeNoise(x, SMIN, SMAX, seed=5)(torch.tensor(s), torch.tensor(t)) for s, t in queries]
    b_tree = BrownianTreeNoise(x, SMIN, SMAX, seed=5)
    b = [b_tree(torch.tensor(s), torch.tensor(t)) for s, t in queries]
    c_tree = BrownianTreeNoise(x, SMIN, SMAX, seed=6)
    c = [c_tree(torch.tensor(s), torch.tensor(t)) for s, t in queries]
    for ai, bi, ci in zip(a, b, c):
        assert ai.shape == x.shape and ai.dtype == x.dtype
        assert torch.equal(ai, bi)  # exact: same seed, same queries
        assert (ai - ci).abs().mean() > 0.5  # independent unit normals differ by ~1.13 on average
    # seeds beyond 2**63 are folded, not rejected
    BrownianTreeNoise(x, SMIN, SMAX, seed=2**64 + 5)(torch.tensor(3.0), torch.tensor(2.0))


def test_brownian_noise_is_unit_normal():
    x = torch.zeros(1, 4, 64, 64)  # 16384 samples
    tree = BrownianTreeNoise(x, SMIN, SMAX, seed=123)
    for s, t in [(14.614641, 12.66), (3.0, 2.99), (0.05, 0.0291672)]:
        z = tree(torch.tensor(s), torch.tensor(t))
        # std error of the mean ~0.008, of the std ~0.006: loose bounds 0.05.
        assert abs(float(z.mean())) < 0.05, (s, t, float(z.mean()))
        assert abs(float(z.std()) - 1) < 0.05, (s, t, float(z.std()))


def test_brownian_increments_are_additive_and_signed():
    x = torch.zeros(1, 4, 16, 16)
    tree = BrownianTreeNoise(x, SMIN, SMAX, seed=99)
    a, b, c = 9.0, 2.5, 0.3  # high -> low, as the sampler queries
    n = lambda s, t: tree(torch.tensor(s), torch.tensor(t))  # noqa: E731
    # Convention: noise(s, t) = (W(t) - W(s)) / sqrt(|t - s|), so for a > b > c
    #   noise(a,c) sqrt(a-c) = W(c) - W(a) = noise(a,b) sqrt(a-b) + noise(b,c) sqrt(b-c).
    lhs = n(a, c) * math.sqrt(a - c)
    rhs = n(a, b) * math.sqrt(a - b) + n(b, c) * math.sqrt(b - c)
    assert_close(lhs, rhs, rtol=1e-5, atol=1e-5, msg="Brownian additivity")
    # reversing the interval flips the sign (W(s) - W(t))
    assert_close(n(c, a), -n(a, c), rtol=0, atol=1e-6, msg="Brownian sign")
    # and the increment is not trivially zero
    assert lhs.abs().mean() > 0.5
