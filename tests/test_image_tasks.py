"""The image-task geometry and mask formulas (pipeline/image_tasks.py) against the rules of
Fooocus's image tasks, written out here case by case."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import image_tasks as it


@pytest.mark.parametrize("h,w,expected", [(1024, 1024, 1024), (896, 1152, 1024), (600, 600, 640),
                                          (1, 1, 64), (1200, 1200, 1216), (513, 512, 576)])
def test_shape_ceil(h, w, expected):
    assert it.shape_ceil(h, w) == expected == math.ceil(math.sqrt(h * w) / 64) * 64


@pytest.mark.parametrize("h,w,ceil,expected", [
    (600, 600, 1024, (1024, 1024)),     # ceil 640 -> 960x960 -> 1024x1024 in two rounds
    (512, 768, 1024, (832, 1216)),
    (300, 1200, 1024, (512, 1920)),
    (1024, 1024, 1024, (1024, 1024)),   # already there: unchanged
    (2400, 1800, 2048, (2304, 1728)),
])
def test_shape_for_ceil_rounds_sides_to_64_until_the_ceil_matches(h, w, ceil, expected):
    # the written rule: scale both sides by target/current, round each to 64, repeat
    hh, ww = h, w
    for _ in range(256):
        cur = math.ceil(math.sqrt(hh * ww) / 64) * 64
        if cur == ceil:
            break
        k = ceil / cur
        hh, ww = int(round(hh * k / 64) * 64), int(round(ww * k / 64) * 64)
    assert it.shape_for_ceil(h, w, ceil) == (hh, ww)
    assert it.shape_ceil(*expected) == ceil and (hh, ww) == expected


def test_vary_image_clamps_the_ceil_to_1024_2048():
    small = np.zeros((300, 400, 3), np.uint8)
    assert it.shape_ceil(*it.vary_image(small).shape[:2]) == 1024
    big = np.zeros((3000, 2000, 3), np.uint8)
    assert it.shape_ceil(*it.vary_image(big).shape[:2]) == 2048
    mid = np.zeros((1100, 1300, 3), np.uint8)  # ceil 1216: within range, untouched
    assert it.vary_image(mid) is mid


@pytest.mark.parametrize("method,overwrite,expected", [("Vary (Subtle)", -1, 0.5), ("Vary (Strong)", -1, 0.85),
                                                       ("Vary (Strong)", 0.3, 0.3), ("Vary (Subtle)", 0, 0.5)])
def test_vary_strength(method, overwrite, expected):
    assert it.vary_strength(method, overwrite) == expected


def test_center_crop_multiple_keeps_the_centre():
    image = np.arange(21 * 19 * 3, dtype=np.int64).reshape(21, 19, 3).astype(np.uint8)
    out = it.center_crop_multiple(image, 8)
    assert out.shape == (16, 16, 3)
    assert np.array_equal(out, image[(21 % 8) // 2:(21 % 8) // 2 + 16, (19 % 8) // 2:(19 % 8) // 2 + 16])


@pytest.mark.parametrize("h,w,method,value,expected", [
    (600, 600, "Upscale (2x)", None, (1200, 1200, False)),            # ceil 1216 >= 1024: exactly 2x
    (600, 600, "Upscale (Fast 2x)", None, (1200, 1200, True)),
    (600, 600, "Upscale (1.5x)", None, (900, 900, False)),             # ceil 960 < 1024: to ceil 1024
    (100, 80, "Upscale (2x)", None, None),
    (1500, 1000, "Upscale (2x)", None, (3000, 2000, False)),          # ceil 2496
    (2000, 1500, "Upscale (2x)", None, (4000, 3000, True)),           # ceil 3520 > 2800: no diffusion
    (600, 600, "Upscale (Custom)", 3.0, (1800, 1800, False)),
    (600, 600, "Upscale (Custom)", 7.0, (1200, 1200, False)),         # out of (0, 5): 2x
])
def test_upscale_plan(h, w, method, value, expected):
    plan = it.upscale_plan(h, w, method, value)
    f = it.upscale_factor(method, value)
    if it.shape_ceil(h * f, w * f) < 1024:
        hh, ww = it.shape_for_ceil(4 * h, 4 * w, 1024)
        assert (plan.height, plan.width) == (hh, ww) and it.shape_ceil(hh, ww) == 1024
    else:
        assert (plan.height, plan.width) == (int(h * f), int(w * f))
    if expected is not None:
        eh, ew, direct = expected
        if it.shape_ceil(h * f, w * f) >= 1024:
            assert (plan.height, plan.width, plan.direct) == (eh, ew, direct)
    assert plan.direct == (method == "Upscale (Fast 2x)" or max(1024, it.shape_ceil(h * f, w * f)) > 2800)


def test_binary_mask_uses_channel_0_and_resizes():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:4, 2:4, 0] = 200
    rgba[:, :, 1] = 255  # other channels are ignored
    mask = it.binary_mask(rgba[:, :, 0])
    assert set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == 4
    assert it.binary_mask(rgba[:, :, 0], (16, 16)).shape == (16, 16)


def test_erode_or_dilate_with_a_3x3_kernel():
    mask = np.zeros((11, 11), np.uint8)
    mask[5, 5] = 255
    assert (it.erode_or_dilate(mask, 2) == 255).sum() == 25        # a 5x5 square
    square = np.zeros((11, 11), np.uint8)
    square[2:9, 2:9] = 255
    assert (it.erode_or_dilate(square, -2) == 255).sum() == 9       # 7x7 -> 3x3
    assert it.erode_or_dilate(square, 0) is square


@pytest.mark.parametrize("sel,dist,shape,pads", [
    (["Left", "Top"], {}, (100, 80), (30, 0, 24, 0)),                  # top int(0.3*100), left int(0.3*80)
    (["Right", "Bottom"], {"right": 17, "bottom": 5}, (100, 80), (0, 5, 0, 17)),
    (["Top", "Bottom", "Left", "Right"], {"top": -1}, (50, 40), (15, 15, 12, 12)),
    ([], {}, (50, 40), (0, 0, 0, 0)),
])
def test_outpaint_pads_the_selected_sides(sel, dist, shape, pads):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
    mask = np.zeros(shape, np.uint8)
    out, m = it.outpaint(image, mask, sel, dist)
    top, bottom, left, right = pads
    assert out.shape == (shape[0] + top + bottom, shape[1] + left + right, 3)
    assert np.array_equal(out[top:top + shape[0], left:left + shape[1]], image)   # original kept in place
    assert (m[top:top + shape[0], left:left + shape[1]] == 0).all()
    assert (m == 255).sum() == m.size - shape[0] * shape[1]                     # new area all masked
    if top:
        assert np.array_equal(out[0, left:left + shape[1]], image[0])         # edge replicated
    if left:
        assert np.array_equal(out[top:top + shape[0], 0], image[:, 0])


def test_respective_field_box():
    mask = np.zeros((200, 300), np.uint8)
    mask[90:110, 140:170] = 255   # bbox rows 90..109, cols 140..169
    a, b, c, d = it.initial_box(mask)
    # centre (99, 154), half sizes (9, 14) -> l = int(14 * 1.15) = 16
    assert (a, b, c, d) == (99 - 16, 99 + 17, 154 - 16, 154 + 17)
    assert it.respective_field_box(mask, 1.0) == (0, 200, 0, 300)
    assert it.respective_field_box(mask, 0.0) == (a, b, c, d)
    a, b, c, d = it.respective_field_box(mask, 0.5)
    assert b - a >= 100 and d - c >= 150
    assert 0 <= a and b <= 200 and 0 <= c and d <= 300
    # the box grows by at most one pixel too many per side in each dimension
    assert b - a <= 100 + 2 or d - c <= 150 + 2


def test_blurred_fill_keeps_known_pixels_and_fills_the_hole_smoothly():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    image[:, :32] = [200, 40, 40]
    image[:, 32:] = [40, 40, 200]
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    filled = it.blurred_fill(image, mask)
    assert np.array_equal(filled[mask < 127], image[mask < 127])
    hole = filled[16:48, 16:48].astype(int)
    assert hole[:, 0, 0].mean() > hole[:, -1, 0].mean()   # red side stays reddish, blue side bluish
    assert hole[:, -1, 2].mean() > hole[:, 0, 2].mean()


def test_feathered_mask_is_a_32px_ramp():
    mask = np.zeros((120, 120), np.uint8)
    mask[50:70, 50:70] = 255
    f = it.feathered_mask(mask)
    assert (f[50:70, 50:70] == 255).all()
    row = f[60, 70:]
    # distance k (1-based) outside the mask: 256 - 8k, clipped to 255
    assert [int(v) for v in row[:33]] == [min(255, max(0, 256 - 8 * k)) for k in range(1, 34)]
    assert (f[:50 - 32, :] == 0).all() and (f[70 + 32:, :] == 0).all()


def test_paste_back_changes_nothing_outside_the_band():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (128, 96, 3), dtype=np.uint8)
    mask = np.zeros((128, 96), np.uint8)
    mask[40:60, 30:50] = 255
    region = it.inpaint_region(image, mask, 0.0, use_fill=True)
    assert it.shape_ceil(*region.crop.shape[:2]) == 1024
    generated = np.full_like(region.crop, 7)
    out = region.paste(generated)
    band = region.feather > 0
    assert np.array_equal(out[~band], image[~band])
    assert (out[mask > 127] == 7).all()


def test_latent_mask_marks_any_touched_cell():
    mask = np.zeros((64, 64), np.uint8)
    mask[9, 17] = 255   # one pixel in latent cell (1, 2)
    lm = it.latent_mask(mask, (8, 8))
    assert lm.shape == (1, 1, 8, 8)
    assert lm.sum() >= 1 and lm[0, 0, 1, 2] == 1
    full = it.latent_mask(np.full((64, 64), 255, np.uint8), (8, 8))
    assert (full == 1).all()


def test_tiled_scale_equals_the_untiled_function_for_a_pointwise_map():
    x = torch.randn(1, 3, 96, 160)

    def fn(t):  # a 2x nearest upsample with a per-pixel map: tiling must not show
        return torch.nn.functional.interpolate(torch.tanh(t), scale_factor=2, mode="nearest")

    tiled = it.tiled_scale(fn, x, (32, 64), 8, 2.0)
    assert torch.allclose(tiled, fn(x), atol=1e-6)
    assert it.tile_starts(96, 32, 8) == [0, 24, 48, 72]
    down = it.tiled_scale(lambda t: t[:, :, ::4, ::4] * 2, x, (32, 64), 16, 0.25)  # the encoder's direction
    assert torch.allclose(down, x[:, :, ::4, ::4] * 2, atol=1e-6)


def test_masked_grey():
    image = np.full((4, 4, 3), 255, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = 255
    g = it.masked_grey(image, mask)
    assert g[0, 0].tolist() == [0.5, 0.5, 0.5] and g[1, 1].tolist() == [1.0, 1.0, 1.0]


def test_decode_b64_mask_first_channel(tmp_path):
    import base64
    import io

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 9
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "PNG")
    assert (it.decode_b64_mask(base64.b64encode(buf.getvalue()).decode()) == 9).all()
