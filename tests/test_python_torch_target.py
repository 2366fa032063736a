"""The python-torch target (the GPU path where TensorRT is absent) serves the checkpoint's torch
modules; on this CPU machine it runs them in fp32, and its image must match the python-ort target's
(the same weights through ONNX Runtime): max pixel difference <= 2 (torch and ONNX Runtime kernels
differ by ~1e-6, amplified a little over the sampling steps)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from .conftest import served_frontend, start_triton


@pytest.fixture(scope="module")
def torch_triton(tiny_checkpoint, tmp_path_factory):
    from export.__main__ import write_torch_repository

    work = tmp_path_factory.mktemp("torch-target")
    repo = write_torch_repository(tiny_checkpoint, work / "repo", device="cpu", work=work)
    launcher = start_triton(repo, work / "triton")
    yield launcher
    launcher.stop()


def test_python_torch_target_matches_python_ort(torch_triton, served, tmp_path):
    request = {"prompt": "a lighthouse at dusk", "aspect_ratios_selection": "256*192", "image_seed": 77,
               "advanced_params": {"overwrite_step": 6}}
    with served_frontend(torch_triton.grpc_url, tmp_path / "torch") as torch_served:
        (a,) = torch_served.client.post("/v1/generation/text-to-image", json=request).json()
        image_torch = np.asarray(Image.open(io.BytesIO(torch_served.client.get(
            a["url"][len(torch_served.base_url):]).content)))
    (b,) = served.client.post("/v1/generation/text-to-image", json=request).json()
    image_ort = np.asarray(Image.open(io.BytesIO(served.client.get(b["url"][len(served.base_url):]).content)))
    assert a["finish_reason"] == b["finish_reason"] == "SUCCESS" and a["seed"] == b["seed"] == "77"
    assert image_torch.shape == image_ort.shape == (192, 256, 3)
    assert np.abs(image_torch.astype(int) - image_ort.astype(int)).max() <= 2


def test_python_torch_target_applies_loras_like_python_ort(torch_triton, served, loras_dir, tiny_checkpoint, tmp_path):
    """The torch leaves merge a LoRA into their weights (pipeline.lora.TorchPatcher); the ONNX
    leaves run patched sessions: same image within the tolerance above, and unlike the image
    without the LoRA."""
    from export.tiny_patches import save_kohya_lora

    save_kohya_lora(loras_dir / "torch_target_style.safetensors", tiny_checkpoint, seed=21)
    request = {"prompt": "a lighthouse at dusk", "aspect_ratios_selection": "256*192", "image_seed": 78,
               "advanced_params": {"overwrite_step": 6},
               "loras": [{"enabled": True, "model_name": "torch_target_style.safetensors", "weight": 0.8}]}

    def image(frontend, body):
        (r,) = frontend.client.post("/v1/generation/text-to-image", json=body).json()
        assert r["finish_reason"] == "SUCCESS", r
        return np.asarray(Image.open(io.BytesIO(frontend.client.get(r["url"][len(frontend.base_url):]).content)))

    with served_frontend(torch_triton.grpc_url, tmp_path / "torch") as torch_served:
        with_lora = image(torch_served, request)
        without = image(torch_served, {**request, "loras": []})
    assert np.abs(with_lora.astype(int) - image(served, request).astype(int)).max() <= 2
    assert np.abs(with_lora.astype(int) - without.astype(int)).max() > 20
