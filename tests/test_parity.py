"""Numerics by parity.

1. Each ONNX leaf model equals its torch module (the exporter's wrappers around the diffusers and
   transformers modules) at a shape other than the export shape, so the dynamic axes are exercised.
   Tolerance: max |onnx - torch| <= 1e-4 * max(1, max |torch|) (float32 kernels differ in
   accumulation order; measured differences are around 1e-6).
2. The image served through HTTP + Triton equals the one the same core computes in-process over
   the same ONNX files, seed and sampler: max abs pixel difference <= 1.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.interfaces import LEAF_MODEL_NAMES, leaf_specs


@pytest.fixture(scope="module")
def torch_leaves(tiny_checkpoint):
    from export.checkpoint import load_checkpoint, model_dims
    from export.onnx_export import torch_modules

    components = load_checkpoint(tiny_checkpoint)
    return torch_modules(components), model_dims(components)


@pytest.mark.parametrize("name", LEAF_MODEL_NAMES)
def test_onnx_leaf_matches_torch_module(name, torch_leaves, onnx_dir):
    from export.onnx_export import example_inputs
    from pipeline.models import OnnxRuntimeModels

    modules, dims = torch_leaves
    spec = leaf_specs(dims)[name]
    inputs = example_inputs(name, dims, batch=1, latent_hw=(24, 32), chunks=1)
    with torch.no_grad():
        expected = modules[name](*[inputs[t.name] for t in spec.inputs])
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = OnnxRuntimeModels(onnx_dir)(name, inputs)
    assert list(got) == [t.name for t in spec.outputs]
    for t, want in zip(spec.outputs, expected):
        have = got[t.name]
        assert tuple(have.shape) == tuple(want.shape)
        assert have.dtype == torch.float32
        tol = 1e-4 * max(1.0, float(want.abs().max()))
        assert float((have - want).abs().max()) <= tol, (name, t.name)


@pytest.mark.parametrize("sampler,size,steps", [("dpmpp_2m_sde_gpu", "256*320", 8), ("euler", "320*256", 5)])
def test_served_image_equals_in_process_image(served, model_repository, onnx_dir, sampler, size, steps):
    from pipeline.generate import Pipeline
    from pipeline.models import OnnxRuntimeModels
    from pipeline.task import GenerationTask

    request = {"prompt": "a watercolor fox", "negative_prompt": "blurry", "aspect_ratios_selection": size,
               "image_seed": 2024, "guidance_scale": 6.0,
               "advanced_params": {"sampler_name": sampler, "overwrite_step": steps}}
    r = served.client.post("/v1/generation/text-to-image", json=request)
    (result,) = r.json()
    assert result["finish_reason"] == "SUCCESS", result
    served_image = np.asarray(Image.open(io.BytesIO(served.client.get(result["url"][len(served.base_url):]).content)))

    pipeline = Pipeline.from_dir(model_repository / "fooocus_pipeline" / "1", OnnxRuntimeModels(onnx_dir))
    images = []
    pipeline.run(GenerationTask.from_dict(request), lambda event, image: images.append(image) if image is not None else None)
    (local,) = images
    assert served_image.shape == local.shape
    assert np.abs(served_image.astype(int) - local.astype(int)).max() <= 1
