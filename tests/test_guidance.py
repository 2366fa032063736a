"""Fooocus's guidance, exactly: sharpness (the anisotropic filter), adaptive CFG and ADM."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.guidance import adm_emphasized, adm_time_ids, anisotropic_filter, guided_denoised
from pipeline.interfaces import ModelDims
from pipeline.schedules import SDXL_SCHEDULE, karras_sigmas


def tensors(seed=0, shape=(1, 4, 9, 10)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def naive_filter(e: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """The joint bilateral filter of the reference written pixel by pixel (float64)."""
    b, c, h, w = e.shape
    g = (guide - guide.mean(axis=(1, 2, 3), keepdims=True)) / (guide.std(axis=(1, 2, 3), ddof=1, keepdims=True) + 1e-5)
    taps = np.exp(-np.arange(-6, 7) ** 2 / 18.0)
    taps /= taps.sum()

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    out = np.zeros_like(e)
    for n in range(b):
        for y in range(h):
            for x in range(w):
                num, den = np.zeros(c), 0.0
                for dy in range(-6, 7):
                    for dx in range(-6, 7):
                        qy, qx = reflect(y + dy, h), reflect(x + dx, w)
                        dist = np.abs(g[n, :, qy, qx] - g[n, :, y, x]).sum()
                        wgt = taps[dy + 6] * taps[dx + 6] * math.exp(-0.5 * dist**2 / 9.0)
                        num += wgt * e[n, :, qy, qx]
                        den += wgt
                out[n, :, y, x] = num / den
    return out


def test_anisotropic_filter_matches_the_formula_pixel_by_pixel():
    e, guide, _ = tensors(1)
    got = anisotropic_filter(e, guide).numpy()
    want = naive_filter(e.double().numpy(), guide.double().numpy())
    assert np.abs(got - want).max() < 1e-5


def test_constant_guide_makes_it_a_gaussian_blur():
    e, _, _ = tensors(2)
    got = anisotropic_filter(e, torch.ones_like(e))
    taps = torch.exp(-torch.arange(-6, 7, dtype=torch.float32) ** 2 / 18)
    kernel = torch.outer(taps, taps) / torch.outer(taps, taps).sum()
    padded = torch.nn.functional.pad(e, (6, 6, 6, 6), mode="reflect")
    blur = torch.nn.functional.conv2d(padded.reshape(4, 1, 21, 22), kernel[None, None]).reshape(e.shape)
    assert torch.allclose(got, blur, atol=1e-5)


@pytest.mark.parametrize("cfg", [1.5, 4.0, 7.0])
def test_sharpness_zero_is_plain_cfg_bit_for_bit(cfg):
    x, d_pos, d_neg = tensors(3)
    plain = x - ((x - d_neg) + cfg * ((x - d_pos) - (x - d_neg)))
    assert torch.equal(guided_denoised(x, d_pos, d_neg, cfg, timestep=500, sharpness=0.0, adaptive_cfg=7.0), plain)


def test_sharpness_blends_the_filtered_positive_with_weight_0_001_s_p():
    x, d_pos, d_neg = tensors(4)
    t, s, cfg = 300.0, 2.0, 4.0
    alpha = 0.001 * s * (1 - t / 999)
    e_pos = alpha * anisotropic_filter(x - d_pos, d_pos) + (1 - alpha) * (x - d_pos)
    want = x - ((x - d_neg) + cfg * (e_pos - (x - d_neg)))
    got = guided_denoised(x, d_pos, d_neg, cfg, timestep=t, sharpness=s, adaptive_cfg=7.0)
    assert torch.allclose(got, want, atol=1e-6) and not torch.equal(got, guided_denoised(x, d_pos, d_neg, cfg, t, 0.0))
    # at t = 999 the progress is 0: no sharpening at all
    assert torch.equal(guided_denoised(x, d_pos, d_neg, cfg, 999.0, s), guided_denoised(x, d_pos, d_neg, cfg, 999.0, 0.0))


def test_adaptive_cfg_mimics_the_lower_scale_early_and_reaches_the_real_one_at_the_end():
    x, d_pos, d_neg = tensors(5)
    cfg, m, t = 12.0, 7.0, 250.0
    p = 1 - t / 999
    e_pos, e_neg = x - d_pos, x - d_neg
    want = x - (p * (e_neg + cfg * (e_pos - e_neg)) + (1 - p) * (e_neg + m * (e_pos - e_neg)))
    assert torch.allclose(guided_denoised(x, d_pos, d_neg, cfg, t, 0.0, m), want, atol=1e-6)
    real = x - (e_neg + cfg * (e_pos - e_neg))
    assert torch.allclose(guided_denoised(x, d_pos, d_neg, cfg, 0.0, 0.0, m), real, atol=1e-6)


def test_adm_time_ids_for_the_default_size():
    pos, neg, consistent = adm_time_ids(1152, 896, 1.5, 0.8)
    assert pos.tolist() == [[1344, 1728, 0, 0, 896, 1152]]
    assert neg.tolist() == [[716, 921, 0, 0, 896, 1152]]
    assert consistent.tolist() == [[896, 1152, 0, 0, 896, 1152]]


def test_adm_emphasis_covers_the_first_ten_karras_steps_at_the_default_end():
    sigmas = karras_sigmas(30, SDXL_SCHEDULE.sigma_min, SDXL_SCHEDULE.sigma_max)[:-1]
    timesteps = [int(SDXL_SCHEDULE.timestep(s.reshape(1))) for s in sigmas]
    emphasized = [t for t in timesteps if adm_emphasized(t, 0.3)]
    assert emphasized == [999, 975, 949, 923, 894, 863, 830, 795, 757, 716]
    assert not any(adm_emphasized(t, 0.0) for t in timesteps)


class RecordingModels:
    """A deterministic stand-in for the leaf models that records every UNet call."""

    def __init__(self):
        self.unet_calls = []

    def __call__(self, model, inputs):
        if model.startswith("text_encoder"):
            ids = inputs["input_ids"].float()
            hidden = torch.sin(ids[:, None, :, None] * torch.arange(1, 5).float() * 0.001).repeat(1, 3, 1, 1)
            return {"hidden_states": hidden, "text_embeds": hidden[:, -1, :, :].mean(1)}
        if model == "unet":
            self.unet_calls.append({k: v.clone() for k, v in inputs.items()})
            return {"noise_pred": torch.tanh(inputs["sample"]) * 0.5}
        if model == "vae_decoder":
            z = inputs["latent"]
            return {"image": torch.tanh(z[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3))}
        raise KeyError(model)


@pytest.fixture
def fake_pipeline(onnx_dir):
    from pipeline.generate import Pipeline
    from pipeline.text import ClipTokenizer

    dims = ModelDims(text_l_hidden=4, text_l_layers=2, text_g_hidden=4, text_g_layers=2, pooled_dim=4,
                     extra={"size_multiple": 32})
    models = RecordingModels()
    return Pipeline(models, ClipTokenizer(onnx_dir / "tokenizer.json"), dims), models


def run(pipeline, **fields):
    from pipeline.task import GenerationTask

    images = []
    pipeline.run(GenerationTask.from_dict({"prompt": "a cat", "aspect_ratios_selection": "256*192",
                                           "image_seed": 1, **fields}),
                 lambda e, img: images.append(img) if img is not None else None)
    return images


def test_adm_changes_time_ids_only_before_adm_scaler_end(fake_pipeline):
    pipeline, models = fake_pipeline
    run(pipeline)
    ids = [c["time_ids"].tolist() for c in models.unet_calls]
    assert len(ids) == 30
    emph = [[288, 384, 0, 0, 192, 256], [153, 204, 0, 0, 192, 256]]
    cons = [[192, 256, 0, 0, 192, 256]] * 2
    assert ids[:10] == [emph] * 10 and ids[10:] == [cons] * 20
    models.unet_calls.clear()
    run(pipeline, advanced_params={"adm_scaler_positive": 1.0, "adm_scaler_negative": 1.0})
    assert all(c["time_ids"].tolist() == cons for c in models.unet_calls)


def test_cfg_one_runs_only_the_positive_prompt(fake_pipeline):
    pipeline, models = fake_pipeline
    run(pipeline, guidance_scale=1.0, advanced_params={"overwrite_step": 4})
    assert [c["sample"].shape[0] for c in models.unet_calls] == [1] * 4


def test_sharpness_changes_the_image_and_zero_sharpness_does_not_filter(fake_pipeline):
    pipeline, _ = fake_pipeline
    steps = {"overwrite_step": 6, "sampler_name": "euler"}
    plain = run(pipeline, sharpness=0.0, advanced_params=steps)[0]
    assert np.array_equal(plain, run(pipeline, sharpness=0.0, advanced_params=steps)[0])
    sharp = run(pipeline, sharpness=30.0, advanced_params=steps)[0]
    assert not np.array_equal(plain, sharp)
