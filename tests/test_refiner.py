"""The refiner through the served pipeline: the embedded default serves a second tiny checkpoint's
UNet as the refiner `tiny-sdxl-refiner.safetensors`; joint, separate and vae swaps, the switch
step rules, and Fooocus-API's fallbacks (an unknown refiner, or the base itself, means none)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from export.__main__ import TINY_REFINER_NAME
from pipeline.generate import Pipeline, UNetPhase
from pipeline.task import GenerationTask

pytestmark = pytest.mark.triton

BASE = {"prompt": "a red cube", "aspect_ratios_selection": "256*256", "image_seed": 11, "style_selections": [],
        "performance_selection": "Speed"}


def generate(frontend, **fields) -> np.ndarray:
    body = {**BASE, **fields}
    body["advanced_params"] = {"overwrite_step": 6, **fields.get("advanced_params", {})}
    r = frontend.client.post("/v1/generation/text-to-image", json=body)
    assert r.status_code == 200, r.text
    (result,) = r.json()
    assert result["finish_reason"] == "SUCCESS", result
    data = frontend.client.get(result["url"].replace(frontend.base_url, "")).content
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def plain(served):
    return generate(served)


@pytest.mark.parametrize("method", ["joint", "separate", "vae"])
def test_each_swap_method_uses_the_refiner(served, plain, method):
    # switch = round(30 * 0.1) = 3 of the 6 steps (Fooocus counts the performance's 30)
    out = generate(served, refiner_model_name=TINY_REFINER_NAME, refiner_switch=0.1,
                   advanced_params={"refiner_swap_method": method})
    assert out.shape == plain.shape and not np.array_equal(out, plain)


def test_swap_methods_differ(served):
    joint = generate(served, refiner_model_name=TINY_REFINER_NAME, refiner_switch=0.1,
                     advanced_params={"refiner_swap_method": "joint"})
    separate = generate(served, refiner_model_name=TINY_REFINER_NAME, refiner_switch=0.1,
                        advanced_params={"refiner_swap_method": "separate"})
    assert not np.array_equal(joint, separate)


@pytest.mark.parametrize("fields", [
    {"refiner_model_name": "no-such-refiner.safetensors", "refiner_switch": 0.1},  # missing file -> None
    {"refiner_model_name": TINY_REFINER_NAME, "refiner_switch": 1.0},         # switch at the last step: no swap
    {"refiner_model_name": TINY_REFINER_NAME, "advanced_params": {"overwrite_switch": -1, "overwrite_step": 6},
     "refiner_switch": 1.0},
])
def test_no_effective_refiner_gives_the_plain_image(served, plain, fields):
    assert np.array_equal(generate(served, **fields), plain)


def test_switch_step_counts_the_performance_steps_before_overwrite():
    """Fooocus: switch = round(S * refiner_switch) with S the performance's steps (Speed 30), not
    overwrite_step; overwrite_switch > 0 replaces it."""
    pipe = Pipeline.__new__(Pipeline)
    pipe.refiners, pipe.checkpoint_name, pipe.inpaint_dir = {TINY_REFINER_NAME: "unet__x"}, "base.safetensors", None

    class Canvas:
        engine, goal, tiled = None, "text_to_image", False

    def phases(**fields):
        task = GenerationTask.from_dict({**BASE, **fields})
        return pipe.unet_phases(task, Canvas(), (), task.steps)

    (base, refiner), switch, method = phases(refiner_model_name=TINY_REFINER_NAME, refiner_switch=0.75)
    assert (switch, method) == (22, "joint")      # round(22.5) = 22, Python's banker's rounding
    assert refiner == UNetPhase("unet__x", (), inpaint_head=False, freeu=False) and base.model == "unet"
    _, switch, _ = phases(refiner_model_name=TINY_REFINER_NAME, advanced_params={"overwrite_step": 6})
    assert switch == 15                           # 30 * 0.5, not 6 * 0.5
    _, switch, method = phases(refiner_model_name=TINY_REFINER_NAME,
                               advanced_params={"overwrite_switch": 1, "refiner_swap_method": "bogus"})
    assert (switch, method) == (1, "joint")
    assert len(phases(refiner_model_name="base.safetensors")[0]) == 1         # the base itself: no refiner
    assert len(phases(refiner_model_name=TINY_REFINER_NAME, performance_selection="Lightning")[0]) == 1


def test_repository_cli_writes_refiner_leaves(tmp_path):
    """`python -m export repository --refiner NAME=ONNX_DIR`: the refiner's UNet as a leaf with the
    UNet's interface (and the `leaf` role parameter the python-ort leaf patches by), listed in
    model_info.json; a checkpoint whose UNet takes other conditioning is refused."""
    import json

    from export.__main__ import DEFAULT_BUILD, build_default, main
    from export.repository import refiner_leaf_name

    build_default()
    onnx = next((DEFAULT_BUILD / "onnx").glob("tiny-sdxl-*"))
    out = tmp_path / "repo"
    assert main(["repository", "--onnx", str(onnx), "--out", str(out), "--target", "tensorrt",
                 "--refiner", f"other.safetensors={onnx / 'refiner'}"]) == 0
    leaf = refiner_leaf_name("other.safetensors")
    info = json.loads((out / "fooocus_pipeline" / "1" / "model_info.json").read_text())
    assert info["refiners"] == {"other.safetensors": leaf}
    config = (out / leaf / "config.pbtxt").read_text()
    assert f'name: "{leaf}"' in config and 'name: "noise_pred"' in config
    profiles = json.loads((out / "trt_profiles.json").read_text())
    assert profiles[leaf] == profiles["unet"]
    bad = tmp_path / "bad"
    (bad).mkdir()
    dims = json.loads((onnx / "dims.json").read_text())
    dims["dims"]["pooled_dim"] += 1
    (bad / "dims.json").write_text(json.dumps(dims))
    with pytest.raises(ValueError, match="conditioning"):
        main(["repository", "--onnx", str(onnx), "--out", str(tmp_path / "r2"), "--refiner", f"x={bad}"])
