"""Vary, upscale, inpaint and outpaint through the served v1 (multipart) and v2 (JSON) routes,
async and sync: the results' sizes follow Fooocus's rules, inpainting leaves every pixel outside
the mask and its feathering band untouched, outpainting extends only the selected sides.

Inputs are small (the diffusion of an image task runs at shape ceil 1024 whatever the input, and
the 4x upscaler's cost grows with the input's pixels); 2 steps each."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline import image_tasks as it

from .conftest import FIXTURE_IMAGES

pytestmark = pytest.mark.triton

FAST = {"overwrite_step": 2}


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def fixture(name: str, size: tuple[int, int]) -> np.ndarray:
    return np.array(Image.open(FIXTURE_IMAGES / name).convert("RGB").resize(size, Image.LANCZOS))


def fixture_mask(size: tuple[int, int]) -> np.ndarray:
    return np.array(Image.open(FIXTURE_IMAGES / "inpaint_mask.png").convert("RGB").resize(size, Image.NEAREST))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def result_image(frontend, result: dict) -> np.ndarray:
    assert result["finish_reason"] == "SUCCESS", result
    r = frontend.client.get(result["url"].replace(frontend.base_url, ""))
    assert r.status_code == 200
    return np.array(Image.open(io.BytesIO(r.content)).convert("RGB"))


def run_v1(frontend, path: str, data: dict, files: dict, asynchronous: bool) -> np.ndarray:
    data = {**data, "advanced_params": json.dumps({**FAST, **data.get("advanced_params", {})}),
            "async_process": str(asynchronous)}
    r = frontend.client.post(path, data=data, files={k: (k, v) for k, v in files.items()})
    assert r.status_code == 200, r.text
    return _result(frontend, r.json(), asynchronous)


def run_v2(frontend, path: str, body: dict, asynchronous: bool) -> np.ndarray:
    body = {**body, "advanced_params": {**FAST, **body.get("advanced_params", {})}, "async_process": asynchronous}
    r = frontend.client.post(path, json=body)
    assert r.status_code == 200, r.text
    return _result(frontend, r.json(), asynchronous)


def _result(frontend, body, asynchronous: bool) -> np.ndarray:
    if asynchronous:
        job = frontend.wait_job(body["job_id"])
        assert job["job_stage"] == "SUCCESS", job
        (result,) = job["job_result"]
    else:
        (result,) = body
    return result_image(frontend, result)


# --- vary ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("route,asynchronous", [("v1", True), ("v2", False)])
def test_vary_output_is_the_shape_ceil_1024_resize(served, route, asynchronous):
    image = fixture("bear.jpg", (96, 64))
    fields = {"uov_method": "Vary (Subtle)", "prompt": "a bear", "image_seed": 1}
    if route == "v1":
        out = run_v1(served, "/v1/generation/image-upscale-vary", fields, {"input_image": png(image)}, asynchronous)
    else:
        out = run_v2(served, "/v2/generation/image-upscale-vary", {**fields, "input_image": b64(png(image))},
                     asynchronous)
    h, w = it.shape_for_ceil(64, 96, 1024)
    assert out.shape == (h, w, 3) and it.shape_ceil(h, w) == 1024


def test_vary_strength_changes_how_far_the_result_moves(served):
    image = fixture("bear.jpg", (64, 64))
    body = {"input_image": b64(png(image)), "uov_method": "Vary (Subtle)", "image_seed": 3,
            "advanced_params": {"overwrite_step": 4}}
    reference = np.array(Image.fromarray(image).resize((1024, 1024), Image.LANCZOS)).astype(float)
    subtle = run_v2(served, "/v2/generation/image-upscale-vary", body, False).astype(float)
    strong = run_v2(served, "/v2/generation/image-upscale-vary",
                    {**body, "advanced_params": {"overwrite_step": 4, "overwrite_vary_strength": 0.95}}, False)
    assert np.abs(subtle - reference).mean() < np.abs(strong.astype(float) - reference).mean()


# --- upscale ------------------------------------------------------------------------------------

@pytest.mark.parametrize("route,asynchronous,method", [("v1", False, "Upscale (2x)"),
                                                       ("v2", True, "Upscale (1.5x)"),
                                                       ("v1", True, "Upscale (Fast 2x)"),
                                                       ("v2", False, "Upscale (Custom)")])
def test_upscale_sizes(served, route, asynchronous, method):
    image = fixture("image_prompt-0.jpg", (64, 48))
    fields = {"uov_method": method, "upscale_value": 1.7, "image_seed": 2}
    if route == "v1":
        out = run_v1(served, "/v1/generation/image-upscale-vary", fields, {"input_image": png(image)}, asynchronous)
    else:
        out = run_v2(served, "/v2/generation/image-upscale-vary", {**fields, "input_image": b64(png(image))},
                     asynchronous)
    plan = it.upscale_plan(48, 64, method, 1.7)
    assert out.shape == (plan.height, plan.width, 3)
    # small inputs go to shape ceil 1024 (the 4x result resized in 64-multiples)
    assert (plan.height, plan.width) == it.shape_for_ceil(4 * 48, 4 * 64, 1024)


# --- inpaint / outpaint -------------------------------------------------------------------------

def inpaint_inputs(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    return fixture("inpaint_source.jpg", (size, size)), fixture_mask((size, size))


@pytest.mark.parametrize("route,asynchronous,engine", [("v1", True, "v2.6"), ("v2", False, "v2.6"),
                                                       ("v2", True, "None")])
def test_inpaint_changes_only_the_mask_and_its_band(served, route, asynchronous, engine):
    image, mask_rgb = inpaint_inputs()
    fields = {"prompt": "a cat", "image_seed": 4,
              "advanced_params": {"inpaint_engine": engine, "inpaint_respective_field": 0.618}}
    if route == "v1":
        out = run_v1(served, "/v1/generation/image-inpaint-outpaint",
                     {**fields, "advanced_params": fields["advanced_params"]},
                     {"input_image": png(image), "input_mask": png(mask_rgb)}, asynchronous)
    else:
        out = run_v2(served, "/v2/generation/image-inpaint-outpaint",
                     {**fields, "input_image": b64(png(image)), "input_mask": b64(png(mask_rgb))}, asynchronous)
    assert out.shape == image.shape
    mask = it.binary_mask(mask_rgb[:, :, 0])
    band = it.feathered_mask(mask) > 0
    assert np.array_equal(out[~band], image[~band])  # exactly: the paste-back weight is 0 there
    changed = np.abs(out.astype(int) - image.astype(int)).sum(axis=2) > 0
    assert changed[mask > 127].mean() > 0.5          # the masked region was regenerated


def test_inpaint_without_mask_or_direction_is_text_to_image(served):
    image, _ = inpaint_inputs(64)
    out = run_v2(served, "/v2/generation/image-inpaint-outpaint",
                 {"input_image": b64(png(image)), "input_mask": None, "aspect_ratios_selection": "256*256"}, False)
    assert out.shape == (256, 256, 3)


@pytest.mark.parametrize("route,asynchronous,sides,distances", [
    ("v1", False, ["Right"], {"right": 24}),
    ("v2", True, ["Top", "Left"], {}),
    ("v2", False, ["Bottom"], {"bottom": -1}),
])
def test_outpaint_extends_only_the_selected_sides(served, route, asynchronous, sides, distances):
    image = fixture("bear.jpg", (96, 80))  # H 80, W 96
    fields = {"prompt": "grass", "image_seed": 5, "outpaint_selections": sides,
              **{f"outpaint_distance_{k}": v for k, v in distances.items()}}
    if route == "v1":
        form = {**fields, "outpaint_selections": ",".join(sides)}
        out = run_v1(served, "/v1/generation/image-inpaint-outpaint", form, {"input_image": png(image)},
                     asynchronous)
    else:
        out = run_v2(served, "/v2/generation/image-inpaint-outpaint", {**fields, "input_image": b64(png(image))},
                     asynchronous)
    top = (distances.get("top") or 0) if "Top" in sides else 0
    top = top if top > 0 else (int(80 * 0.3) if "Top" in sides else 0)
    bottom = distances.get("bottom") or 0
    bottom = bottom if bottom > 0 else (int(80 * 0.3) if "Bottom" in sides else 0)
    height = 80 + top + bottom
    left = int(96 * 0.3) if "Left" in sides else 0
    right = (distances.get("right") or int(96 * 0.3)) if "Right" in sides else 0
    assert out.shape == (height, 96 + left + right, 3)
    # the original sits where it was, untouched beyond the 32 px feathering band
    inner = out[top:top + 80, left:left + 96]
    keep = np.ones((80, 96), bool)
    if top:
        keep[:32] = False
    if bottom:
        keep[-32:] = False
    if left:
        keep[:, :32] = False
    if right:
        keep[:, -32:] = False
    assert np.array_equal(inner[keep], image[keep])


def test_fast_2x_of_a_real_photo_is_exactly_twice_the_size(served):
    """Real-ESRGAN x4plus, then Lanczos to 2x: no diffusion. 512 px has shape ceil 1024 at 2x, so the
    result is exactly 2x (smaller inputs go to shape ceil 1024 instead)."""
    photo = np.array(Image.open(FIXTURE_IMAGES / "bear.jpg").convert("RGB"))[44:556, 44:556]
    out = run_v2(served, "/v2/generation/image-upscale-vary",
                 {"input_image": b64(png(photo)), "uov_method": "Upscale (Fast 2x)", "image_number": 3}, False)
    assert out.shape == (1024, 1024, 3)
    # faithful: close to a plain Lanczos 2x of the same photo (a broken network lands far below)
    lanczos = np.array(Image.fromarray(photo).resize((1024, 1024), Image.LANCZOS)).astype(float)
    mse = np.mean((out.astype(float) - lanczos) ** 2)
    assert 10 * np.log10(255 ** 2 / mse) > 25
