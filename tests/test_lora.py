"""LoRAs and weight patches (pipeline.lora), in process and served.

Reference implementations, independent of pipeline.lora's key mapping and merge:
- LoRA files (kohya with sgm UNet names and both text encoders; diffusers/peft): diffusers'
  `load_lora_weights` + `fuse_lora` (peft) on the tiny checkpoint's torch modules;
- the Fooocus inpaint patch and the inpaint head: the deltas `export.tiny_patches` computes from
  the file's own tensors, by module names written out by hand for the tiny UNet, added to the
  torch weights.
The ONNX path (patched ONNX Runtime sessions) must match within the leaf parity tolerance of
tests/test_parity.py: max |onnx - torch| <= 1e-4 * max(1, max |torch|) (measured about 1e-6); the
patches change the outputs by 0.1-1, so a patch that was not applied cannot pass.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from export import tiny_patches
from pipeline import lora
from pipeline.errors import UnsupportedFeature
from pipeline.interfaces import INPAINT_HEAD_PARAM, TEXT_ENCODER_G, TEXT_ENCODER_L, UNET, leaf_specs
from pipeline.lora import FOOOCUS_PATCH, INPAINT_HEAD, LORA, MissingModelFile, Patch

LEAVES = (TEXT_ENCODER_L, TEXT_ENCODER_G, UNET)


def tolerance(reference: torch.Tensor) -> float:
    return 1e-4 * max(1.0, float(reference.abs().max()))


@pytest.fixture(scope="module")
def dims(onnx_dir):
    from pipeline.interfaces import ModelDims

    return ModelDims.from_json(json.loads((onnx_dir / "dims.json").read_text())["dims"])


@pytest.fixture(scope="module")
def runner(onnx_dir):
    from pipeline.models import OnnxRuntimeModels

    return OnnxRuntimeModels(onnx_dir, cache_size=8)


def leaf_inputs(leaf, dims):
    from export.onnx_export import example_inputs

    inputs = example_inputs(leaf, dims, batch=1, latent_hw=(16, 24), chunks=1)
    if leaf == UNET:  # a non-zero inpaint head input, so the head's weight matters
        inputs["inpaint_latent"] = torch.randn(inputs["inpaint_latent"].shape, generator=torch.Generator().manual_seed(5))
    return inputs


def run_torch(module, leaf, dims, inputs):
    with torch.no_grad():
        out = module(*[inputs[t.name] for t in leaf_specs(dims)[leaf].inputs])
    return out if isinstance(out, tuple) else (out,)


def fused_modules(checkpoint: Path, lora_file: Path, weight: float):
    """The torch leaves with the LoRA fused by diffusers + peft."""
    pytest.importorskip("peft")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionXLPipeline

    from pipeline.torch_leaves import TextEncoderG, TextEncoderL
    from pipeline.torch_leaves import UNet as UNetLeaf

    pipe = StableDiffusionXLPipeline.from_pretrained(checkpoint, local_files_only=True)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(lora_scale=weight)
    pipe.unload_lora_weights()  # the fused weights stay
    return {TEXT_ENCODER_L: TextEncoderL(pipe.text_encoder).eval(), TEXT_ENCODER_G: TextEncoderG(pipe.text_encoder_2).eval(),
            UNET: UNetLeaf(pipe.unet).eval()}


def delta_modules(checkpoint: Path, deltas: dict, weight: float):
    """The torch leaves with `weight` * the expected deltas added (the inpaint head replaced)."""
    from pipeline.torch_leaves import load_leaf

    modules = {}
    for leaf in LEAVES:
        module = load_leaf(leaf, str(checkpoint))
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, delta in deltas.get(leaf, {}).items():
                params[name].copy_(weight * delta if name == INPAINT_HEAD_PARAM else params[name] + weight * delta)
        modules[leaf] = module
    return modules


def assert_onnx_matches(runner, modules, dims, patches, base_runner_patches=()):
    changed = 0.0
    for leaf in LEAVES:
        inputs = leaf_inputs(leaf, dims)
        want = run_torch(modules[leaf], leaf, dims, inputs)
        got = runner(leaf, inputs, patches=lora.for_leaf(leaf, patches))
        base = runner(leaf, inputs)
        for spec, w in zip(leaf_specs(dims)[leaf].outputs, want):
            assert float((got[spec.name] - w).abs().max()) <= tolerance(w), (leaf, spec.name)
            changed = max(changed, float((got[spec.name] - base[spec.name]).abs().max()))
    assert changed > 0.05  # the patches did something


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_lora_through_onnx_equals_diffusers_fuse(fmt, tmp_path, tiny_checkpoint, runner, dims):
    path = tmp_path / f"{fmt}.safetensors"
    writer = tiny_patches.save_kohya_lora if fmt == "kohya" else tiny_patches.save_diffusers_lora
    expected = writer(path, tiny_checkpoint)
    weight = 0.7
    # the independent references agree with each other first (diffusers' mapping vs the hand table)
    fused = fused_modules(tiny_checkpoint, path, weight)
    plain = delta_modules(tiny_checkpoint, {}, 0.0)
    for leaf, deltas in expected.items():
        fused_params, plain_params = dict(fused[leaf].named_parameters()), dict(plain[leaf].named_parameters())
        changed = {n for n in plain_params if not torch.equal(fused_params[n], plain_params[n])}
        assert changed == set(deltas), leaf
        for name, delta in deltas.items():
            assert torch.allclose(fused_params[name] - plain_params[name], weight * delta, atol=1e-6), name
    assert_onnx_matches(runner, fused, dims, (Patch(LORA, str(path), weight),))


def test_fooocus_patch_and_inpaint_head_through_onnx(tmp_path, tiny_checkpoint, runner, dims):
    patch_file, head_file = tmp_path / "inpaint.fooocus.patch", tmp_path / "fooocus_inpaint_head.pth"
    deltas = tiny_patches.save_fooocus_patch(patch_file, tiny_checkpoint)
    head = tiny_patches.save_inpaint_head(head_file, tiny_checkpoint)
    kohya = tmp_path / "k.safetensors"
    lora_deltas = tiny_patches.save_kohya_lora(kohya, tiny_checkpoint)
    # a patch alone, the head alone, and everything together (deltas add, the head replaces)
    assert_onnx_matches(runner, delta_modules(tiny_checkpoint, deltas, 1.0), dims, (Patch(FOOOCUS_PATCH, str(patch_file)),))
    assert_onnx_matches(runner, delta_modules(tiny_checkpoint, head, 1.0), dims, (Patch(INPAINT_HEAD, str(head_file)),))
    together = {UNET: {**deltas[UNET]}}
    for leaf, d in lora_deltas.items():
        for name, value in d.items():
            together.setdefault(leaf, {})[name] = together.get(leaf, {}).get(name, 0) + 0.5 * value
    together[UNET][INPAINT_HEAD_PARAM] = head[UNET][INPAINT_HEAD_PARAM]
    patches = (Patch(FOOOCUS_PATCH, str(patch_file)), Patch(INPAINT_HEAD, str(head_file)),
               Patch(LORA, str(kohya), 0.5))
    assert_onnx_matches(runner, delta_modules(tiny_checkpoint, together, 1.0), dims, patches)


def test_unmatched_keys_are_counted_and_the_rest_applied(tmp_path, tiny_checkpoint, onnx_dir):
    from safetensors.torch import load_file, save_file

    from pipeline.models import OnnxWeights

    path = tmp_path / "odd.safetensors"
    tiny_patches.save_kohya_lora(path, tiny_checkpoint)
    state = load_file(str(path))
    state["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(4, 8)
    state["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(8, 4)
    # the right module, the wrong shape
    state["lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_v.lora_down.weight"] = torch.zeros(4, 5)
    state["lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_v.lora_up.weight"] = torch.zeros(64, 4)
    state["lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q.dora_scale"] = torch.ones(64)
    save_file(state, str(path))
    updates, report = lora.leaf_updates(UNET, (Patch(LORA, str(path), 1.0),), OnnxWeights(onnx_dir / "unet.onnx"))
    (unmatched,) = report.unmatched.values()
    assert len(unmatched) == 3 and any("dora_scale" in k for k in unmatched)
    assert len(updates) == len([m for m in tiny_patches.KOHYA_MODULES if m[1] == UNET])


def test_patched_sessions_are_cached(tmp_path, tiny_checkpoint, onnx_dir, dims):
    from pipeline.models import OnnxRuntimeModels

    a, b, unet_only = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "p.fooocus.patch"
    tiny_patches.save_kohya_lora(a, tiny_checkpoint, seed=10)
    tiny_patches.save_diffusers_lora(b, tiny_checkpoint, seed=11)
    tiny_patches.save_fooocus_patch(unet_only, tiny_checkpoint)
    models = OnnxRuntimeModels(onnx_dir, cache_size=1)
    inputs = leaf_inputs(UNET, dims)
    pa, pb = (Patch(LORA, str(a), 0.5),), (Patch(LORA, str(b), 0.5),)
    first = models(UNET, inputs, patches=pa)["noise_pred"]
    again = models(UNET, inputs, patches=pa)["noise_pred"]
    assert torch.equal(first, again)
    models(UNET, inputs, patches=pb)  # evicts a (one patched session per leaf here)
    models(UNET, inputs, patches=pa)
    assert models.sessions[UNET].stats() == {"hits": 1, "misses": 3, "evictions": 2, "cached": 1}
    # weight 0 is the base model, bit for bit, without a lookup
    base = models(UNET, inputs)["noise_pred"]
    assert torch.equal(models(UNET, inputs, patches=lora.canonical([Patch(LORA, str(a), 0.0)]))["noise_pred"], base)
    assert models.sessions[UNET].stats()["hits"] == 1
    # a UNet-only patch leaves the text encoders' sessions alone
    models(TEXT_ENCODER_L, leaf_inputs(TEXT_ENCODER_L, dims))
    sessions = models.sessions[TEXT_ENCODER_L]
    assert sessions.session((Patch(FOOOCUS_PATCH, str(unet_only)),)) is sessions.base
    # a replaced file is merged again
    stats = models.sessions[UNET].stats()
    tiny_patches.save_kohya_lora(a, tiny_checkpoint, seed=12)
    os.utime(a, ns=(1, 1))
    assert not torch.equal(models(UNET, inputs, patches=pa)["noise_pred"], first)
    assert models.sessions[UNET].stats()["misses"] == stats["misses"] + 1


def test_torch_patcher_merges_restores_and_caches(tmp_path, tiny_checkpoint, dims):
    from pipeline.torch_leaves import load_leaf

    path = tmp_path / "k.safetensors"
    deltas = tiny_patches.save_kohya_lora(path, tiny_checkpoint)
    module = load_leaf(UNET, str(tiny_checkpoint))
    patcher = lora.TorchPatcher(module, UNET, cache_size=2)
    inputs = leaf_inputs(UNET, dims)
    (base,) = run_torch(module, UNET, dims, inputs)
    patches = (Patch(LORA, str(path), 0.5),)
    assert patcher.apply(patches) == "miss"
    (patched,) = run_torch(module, UNET, dims, inputs)
    (want,) = run_torch(delta_modules(tiny_checkpoint, deltas, 0.5)[UNET], UNET, dims, inputs)
    assert float((patched - want).abs().max()) <= tolerance(want)
    assert patcher.apply(patches) == "current"
    assert patcher.apply(()) == "base"
    assert torch.equal(run_torch(module, UNET, dims, inputs)[0], base)  # base weights restored exactly
    assert patcher.apply(patches) == "hit"
    assert torch.equal(run_torch(module, UNET, dims, inputs)[0], patched)


def test_task_lora_list(tmp_path):
    from pipeline.presets import PERFORMANCES

    folder = tmp_path / "loras"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.safetensors", "b.safetensors", "sub/c.safetensors", "sdxl_lcm_lora.safetensors"):
        (folder / name).write_bytes(b"")
    speed, extreme = PERFORMANCES["Speed"], PERFORMANCES["Extreme Speed"]
    user = [("a.safetensors", 0.5), ("missing.safetensors", 1.0), ("../a.safetensors", 1.0), ("b.safetensors", 0.0)]
    t = lora.task_loras(user, "a cat, <lora:c:0.3>, <lora:nope:1>", speed, folder)
    assert t.applied == (("a.safetensors", 0.5), ("b.safetensors", 0.0), ("sub/c.safetensors", 0.3))
    assert t.patches == (Patch(LORA, str(folder / "a.safetensors"), 0.5),
                         Patch(LORA, str(folder / "sub/c.safetensors"), 0.3))  # weight 0: no patch
    # the performance LoRA comes last and cannot be named by a tag
    t = lora.task_loras([], "x <lora:sdxl_lcm_lora:0.5>", extreme, folder)
    assert t.applied == (("sdxl_lcm_lora.safetensors", 1.0),)
    # the request's list is kept when no tag adds anything; with one, it is cut to 5
    many = [(n, 1.0) for n in ("a.safetensors",) * 5]
    assert len(lora.task_loras(many, "<lora:b:1>", speed, folder).applied) == 5
    (folder / "sdxl_lcm_lora.safetensors").unlink()
    with pytest.raises(MissingModelFile, match=rf"sdxl_lcm_lora\.safetensors.*{re.escape(str(folder))}"):
        lora.task_loras([], "a cat", extreme, folder)


def test_task_user_loras_parse_every_request_shape():
    from pipeline.task import GenerationTask

    task = GenerationTask.from_dict({"loras": [
        {"enabled": True, "model_name": "a.safetensors", "weight": 0.5}, {"enabled": False, "model_name": "b", "weight": 1},
        [True, "c.safetensors", 0.25], ["d.safetensors", 2.0], {"model_name": "None", "weight": 1.0},
        {"model_name": "e.safetensors"}, {"model_name": "f.safetensors"}]})
    assert task.user_loras == [("a.safetensors", 0.5), ("c.safetensors", 0.25), ("d.safetensors", 2.0)]
    assert GenerationTask().user_loras == [("sd_xl_offset_example-lora_1.0.safetensors", 0.1)]


def test_static_weight_target_refuses_loras(model_repository, loras_dir, tiny_checkpoint):
    from pipeline.generate import Pipeline
    from pipeline.task import GenerationTask

    tiny_patches.save_kohya_lora(loras_dir / "static_check.safetensors", tiny_checkpoint)
    task = GenerationTask.from_dict({"prompt": "a cat", "loras": [[True, "static_check.safetensors", 0.5]]})
    pipeline = Pipeline.from_dir(model_repository / "fooocus_pipeline" / "1", models=None)
    assert pipeline.task_loras(task, task.prompt).patches  # python-ort takes them
    pipeline.target = "onnxruntime"
    with pytest.raises(UnsupportedFeature, match="'onnxruntime' target"):
        pipeline.task_loras(task, task.prompt)
    assert not pipeline.task_loras(GenerationTask.from_dict({"loras": []}), "a cat").patches
    pipeline.target = "tensorrt"  # refitted engines (pipeline.trt_runtime)
    assert pipeline.task_loras(task, task.prompt).patches


# --- served end to end ---------------------------------------------------------------------------

REQUEST = {"prompt": "a red fox", "negative_prompt": "blurry", "aspect_ratios_selection": "256*256", "image_seed": 31,
           "guidance_scale": 4.0, "style_selections": [],
           "advanced_params": {"overwrite_step": 4, "sampler_name": "euler", "disable_preview": True}}


def served_image(served, **fields) -> tuple[np.ndarray, Image.Image]:
    (result,) = served.client.post("/v1/generation/text-to-image", json={**REQUEST, **fields}).json()
    assert result["finish_reason"] == "SUCCESS", result
    image = Image.open(io.BytesIO(served.client.get(result["url"][len(served.base_url):]).content))
    return np.asarray(image.convert("RGB")), image


def patch_lookups(triton, model: str = UNET) -> dict:
    text = httpx.get(f"http://127.0.0.1:{triton.metrics_port}/metrics").text
    found = re.findall(rf'fooocus_patched_session_lookups_total\{{model="{model}",result="(\w+)"\}} (\d+)', text)
    return {result: int(count) for result, count in found}


@pytest.mark.triton
def test_served_loras(served, triton, loras_dir, tiny_checkpoint, model_repository, onnx_dir):
    tiny_patches.save_kohya_lora(loras_dir / "tiny_style.safetensors", tiny_checkpoint)
    none, _ = served_image(served, loras=[])
    half, meta_image = served_image(served, loras=[{"enabled": True, "model_name": "tiny_style.safetensors",
                                                   "weight": 0.5}], save_meta=True)
    assert np.abs(half.astype(int) - none.astype(int)).max() > 20  # the LoRA changes the image
    # the metadata records the applied LoRA
    meta = json.loads(meta_image.text["parameters"])
    assert meta["lora_combined_1"] == "tiny_style : 0.5" and meta["loras"] == [["tiny_style", 0.5, ""]]
    # a repeat is served by the cached patched sessions: no new merge
    before = patch_lookups(triton)
    again, _ = served_image(served, loras=[{"enabled": True, "model_name": "tiny_style.safetensors", "weight": 0.5}])
    after = patch_lookups(triton)
    assert np.array_equal(again, half)
    assert after.get("miss", 0) == before.get("miss", 0) and after["hit"] >= before.get("hit", 0) + 4
    # weight 0 and an unknown name give the image without LoRA, bit for bit
    zero, _ = served_image(served, loras=[{"enabled": True, "model_name": "tiny_style.safetensors", "weight": 0}])
    unknown, _ = served_image(served, loras=[{"enabled": True, "model_name": "not_there.safetensors", "weight": 1}])
    assert np.array_equal(zero, none) and np.array_equal(unknown, none)
    # a <lora:name:w> tag in the prompt applies the file (the tag itself leaves the prompt)
    tagged, _ = served_image(served, loras=[], prompt="a red fox, <lora:tiny_style:0.5>")
    assert np.array_equal(tagged, half)
    # the served image equals the in-process core over the same ONNX files and LoRA (parity)
    from pipeline.generate import Pipeline
    from pipeline.models import OnnxRuntimeModels
    from pipeline.task import GenerationTask

    pipeline = Pipeline.from_dir(model_repository / "fooocus_pipeline" / "1", OnnxRuntimeModels(onnx_dir))
    images, events = [], []
    task = GenerationTask.from_dict({**REQUEST, "loras": [[True, "tiny_style.safetensors", 0.5]]})
    pipeline.run(task, lambda e, image: (events.append(e), image is not None and images.append(image)))
    assert np.abs(images[0].astype(int) - half.astype(int)).max() <= 1
    assert [e for e in events if e["type"] == "result"][0]["loras"] == [["tiny_style.safetensors", 0.5]]


@pytest.mark.triton
def test_served_performance_lora(served, loras_dir, tiny_checkpoint):
    body = {**REQUEST, "performance_selection": "Extreme Speed", "async_process": True}
    job = served.wait_job(served.client.post("/v1/generation/text-to-image", json=body).json()["job_id"])
    assert job["job_stage"] == "ERROR"
    assert "sdxl_lcm_lora.safetensors" in job["job_status"] and str(loras_dir) in job["job_status"]
    path = loras_dir / "sdxl_lcm_lora.safetensors"
    tiny_patches.save_kohya_lora(path, tiny_checkpoint, seed=7)
    try:
        (result,) = served.client.post("/v1/generation/text-to-image",
                                       json={**REQUEST, "performance_selection": "Extreme Speed"}).json()
        assert result["finish_reason"] == "SUCCESS", result
    finally:
        path.unlink()  # other tests expect the restricted modes to miss their LoRAs
