"""Batching across jobs without Triton: the grouping/concat/split helpers the python leaves use,
the pipeline's call splitter, FreeU's per-sample factors in a mixed batch, and the two python
leaves' `execute` over a list of requests (a stand-in for `triton_python_backend_utils`)."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

from pipeline.batching import BatchLimitedRunner, concat, group_requests, run_grouped, shape_key, split
from pipeline.interfaces import (LEAF_MAX_BATCH, LEAF_MODEL_NAMES, PATCHES_PARAMETER, TEXT_ENCODER_L, UNET,
                                 ModelDims, leaf_max_batch, leaf_specs)

from .conftest import ROOT

# --- grouping, concat, split ------------------------------------------------------------------------


def test_group_requests_keeps_first_appearance_order():
    items = ["a1", "b1", "a2", "c1", "b2", "a3"]
    assert group_requests(items, key=lambda s: s[0]) == [[0, 2, 5], [1, 4], [3]]
    assert group_requests([], key=lambda s: s) == []


def test_shape_key_ignores_the_batch_axis_only():
    a = {"x": np.zeros((2, 4, 8, 8), np.float32), "t": np.zeros((2,), np.float32)}
    b = {"x": np.ones((5, 4, 8, 8), np.float32), "t": np.ones((5,), np.float32)}
    c = {"x": np.zeros((2, 4, 8, 16), np.float32), "t": np.zeros((2,), np.float32)}
    d = {"x": np.zeros((2, 4, 8, 8), np.float64), "t": np.zeros((2,), np.float32)}
    assert shape_key(a) == shape_key(b) != shape_key(c) != shape_key(d) != shape_key(a)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_concat_then_split_round_trips(kind):
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((n, 3, 4)).astype(np.float32), "ids": rng.integers(0, 9, (n, 77))}
             for n in (2, 1, 3)]
    if kind == "torch":
        feeds = [{k: torch.from_numpy(v) for k, v in f.items()} for f in feeds]
    batch, sizes = concat(feeds)
    assert sizes == [2, 1, 3] and batch["x"].shape == (6, 3, 4) and batch["ids"].shape == (6, 77)
    for part, original in zip(split(batch, sizes), feeds):
        assert set(part) == set(original)
        for name in part:
            assert np.array_equal(np.asarray(part[name]), np.asarray(original[name]))
    single, sizes = concat(feeds[:1])
    assert sizes == [2] and single["x"] is feeds[0]["x"]  # one request: no copy
    with pytest.raises(ValueError, match="batch 6"):
        split(batch, [2, 2])


def test_run_grouped_runs_each_compatible_group_once_and_fails_groups_alone():
    def feeds(n, width, value):
        return {"x": np.full((n, width), value, np.float32)}

    broken = RuntimeError("weight patches: FileNotFoundError: missing.safetensors")
    items = [("base", feeds(2, 4, 1)), broken, ("lora", feeds(2, 4, 2)), ("base", feeds(1, 4, 3)),
             ("base", feeds(2, 8, 4)), ("bad", feeds(1, 4, 5)), ("base", feeds(2, 4, 6))]
    calls = []

    def run(key, batch):
        calls.append((key, batch["x"].shape))
        if key == "bad":
            raise ValueError("this set cannot run")
        return {"y": batch["x"] * 10 + (100 if key == "lora" else 0), "n": np.arange(len(batch["x"]))}

    out = run_grouped(items, run)
    # base/width 4 (three requests, 5 samples), lora, base/width 8, bad: one call each
    assert calls == [("base", (5, 4)), ("lora", (2, 4)), ("base", (2, 8)), ("bad", (1, 4))]
    assert out[1] is broken and isinstance(out[5], ValueError)
    for i in (0, 2, 3, 4, 6):
        key, f = items[i]
        assert np.array_equal(out[i]["y"], f["x"] * 10 + (100 if key == "lora" else 0))
    assert list(out[0]["n"]) == [0, 1] and list(out[3]["n"]) == [2] and list(out[6]["n"]) == [3, 4]


# --- the pipeline's call splitter ------------------------------------------------------------------


class RecordingRunner:
    """A leaf stand-in: output = f(input) per sample, and the shapes and patches of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, inputs, patches=()):
        self.calls.append((model, {k: tuple(v.shape) for k, v in inputs.items()}, patches))
        x = inputs["x"]
        out = {"y": x * 2 + 1, "pooled": x.flatten(1).sum(1, keepdim=True)}
        if "t" in inputs:
            out["t_out"] = inputs["t"] + 1
        return out


def test_batch_limited_runner_splits_large_calls_and_gives_the_unsplit_outputs():
    inner = RecordingRunner()
    runner = BatchLimitedRunner(inner, {"enc": 4})
    x = torch.randn(11, 3)
    out = runner("enc", {"x": x})
    assert [c[1]["x"][0] for c in inner.calls] == [4, 4, 3]
    reference = RecordingRunner()("enc", {"x": x})
    assert all(torch.equal(out[k], reference[k]) for k in reference)
    inner.calls.clear()
    runner("enc", {"x": x[:4]})  # within the limit: one call, the tensors as they were
    runner("other", {"x": x})  # no limit known: unchanged
    assert [c[1]["x"][0] for c in inner.calls] == [4, 11]


def test_batch_limited_runner_forwards_patches_and_sends_batch_only_tensors_as_columns():
    inner = RecordingRunner()
    runner = BatchLimitedRunner(inner, {"unet": 2}, {"unet": {"t", "t_out"}})
    x, t = torch.randn(3, 4), torch.tensor([999.0, 999.0, 500.0])
    patches = (("lora", "/x.safetensors", 0.5),)
    out = runner("unet", {"x": x, "t": t}, patches=patches)
    assert [c[1] for c in inner.calls] == [{"x": (2, 4), "t": (2, 1)}, {"x": (1, 4), "t": (1, 1)}]
    assert [c[2] for c in inner.calls] == [patches, patches]
    assert out["t_out"].shape == (3,) and torch.equal(out["t_out"], t.reshape(-1, 1).add(1).reshape(-1))
    assert torch.equal(out["y"], x * 2 + 1)
    inner.calls.clear()
    runner("unet", {"x": x[:1], "t": t[:1]})
    assert inner.calls[0][2] == ()  # no patches: called without the argument (with_patches' contract)


def test_batch_limits_come_from_the_interface_and_refiners_take_the_unets():
    dims = ModelDims(32, 3, 32, 3, 32, extra={"expansion_vocab": 100, "upscaler_scale": 4})
    specs = leaf_specs(dims)
    assert set(specs) == set(LEAF_MODEL_NAMES) == set(LEAF_MAX_BATCH)
    specs["unet__refiner"] = specs[UNET]
    runner = BatchLimitedRunner.for_specs(RecordingRunner(), specs)
    assert runner.max_batch["unet__refiner"] == runner.max_batch[UNET] == leaf_max_batch(UNET) == 8
    assert runner.max_batch[TEXT_ENCODER_L] == 32 and runner.max_batch["upscaler"] == 1
    assert runner.batch_only[UNET] == runner.batch_only["unet__refiner"] == {"timestep"}
    assert not runner.batch_only[TEXT_ENCODER_L]


# --- FreeU's factors are per sample ------------------------------------------------------------------


def test_freeu_v2_in_a_batch_of_samples_with_different_factors_equals_each_alone():
    from pipeline.freeu import freeu_v2

    torch.manual_seed(0)
    h, hsp = torch.randn(3, 8, 6, 10), torch.randn(3, 8, 6, 10)
    b, s = torch.tensor([1.0, 1.3, 0.9]), torch.tensor([1.0, 0.2, 0.6])
    h_all, hsp_all = freeu_v2(h, hsp, b, s)
    for i in range(3):
        h_one, hsp_one = freeu_v2(h[i:i + 1], hsp[i:i + 1], b[i:i + 1], s[i:i + 1])
        assert torch.allclose(h_all[i:i + 1], h_one, atol=1e-6) and torch.allclose(hsp_all[i:i + 1], hsp_one, atol=1e-6)
    assert torch.equal(h_all[0], h[0]) and torch.allclose(hsp_all[0], hsp[0], atol=1e-6)  # identity factors


def test_onnx_unet_is_batch_invariant_with_per_sample_freeu(onnx_dir):
    """Two jobs' CFG pairs (different latents, timesteps, conditioning and FreeU factors) through
    ONNX Runtime as one batch of 4 give, bit for bit, what each pair gives alone (what lets
    the served images stay the same when the dynamic batcher merges jobs)."""
    from export.onnx_export import example_inputs
    from pipeline.models import OnnxRuntimeModels

    dims = ModelDims.from_json(json.loads((onnx_dir / "dims.json").read_text())["dims"])
    models = OnnxRuntimeModels(onnx_dir)
    a = example_inputs(UNET, dims, batch=2, latent_hw=(16, 16), chunks=1)
    torch.manual_seed(1)
    b = {k: v + torch.randn_like(v) for k, v in a.items()}
    b["freeu"] = torch.tensor([[1.3, 1.4, 0.9, 0.2]] * 2)
    both = models(UNET, {k: torch.cat([a[k], b[k]]) for k in a})["noise_pred"]
    assert torch.equal(both, torch.cat([models(UNET, a)["noise_pred"], models(UNET, b)["noise_pred"]]))


# --- the python leaves' execute over several requests -------------------------------------------------


class FakeTensor:
    def __init__(self, name, value):
        self.name, self.value = name, value

    @classmethod
    def from_dlpack(cls, name, value):
        return cls(name, value)

    def as_numpy(self):
        return np.asarray(self.value)

    def to_dlpack(self):
        return torch.as_tensor(self.value).__dlpack__()


class FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: np.asarray(t.value) for t in output_tensors or ()}
        self.error = error


class FakeRequest:
    def __init__(self, inputs: dict, patches: str | None = None):
        self.inputs = {k: FakeTensor(k, v) for k, v in inputs.items()}
        self._params = json.dumps({PATCHES_PARAMETER: patches} if patches is not None else {})

    def parameters(self):
        return self._params


def fake_pb_utils():
    class Family:
        COUNTER = "counter"

        def __init__(self, **kwargs):
            self.counts = {}

        def Metric(self, labels):  # Triton's name
            family = self

            class Metric:
                def increment(self, n):
                    family.counts[labels["result"]] = family.counts.get(labels["result"], 0) + n

            return Metric()

    return types.SimpleNamespace(
        Tensor=FakeTensor, InferenceResponse=FakeResponse, TritonError=lambda message: message, MetricFamily=Family,
        get_input_tensor_by_name=lambda request, name: request.inputs[name])


def load_leaf_model(folder: str, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    spec = importlib.util.spec_from_file_location(f"leaf_{folder}", ROOT / "model_repository" / folder / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel()


def unet_requests(dims, seed):
    from export.onnx_export import example_inputs

    torch.manual_seed(seed)
    small = example_inputs(UNET, dims, batch=2, latent_hw=(8, 8), chunks=1)
    other = {k: v + torch.randn_like(v) for k, v in small.items()}
    other["freeu"] = torch.tensor([[1.2, 1.1, 0.8, 0.5]] * 2)
    large = example_inputs(UNET, dims, batch=1, latent_hw=(8, 16), chunks=1)
    arrays = [{k: v.numpy() for k, v in f.items()} for f in (small, other, large, small)]
    return arrays, [FakeRequest(arrays[0]), FakeRequest(arrays[1]), FakeRequest(arrays[2]),
                    FakeRequest(arrays[3], patches=json.dumps([["lora", "/nowhere/missing.safetensors", 1.0]]))]


def check_leaf_responses(model, arrays, requests, tolerance):
    responses = model.execute(requests)
    assert len(responses) == 4
    assert responses[3].error is not None and "weight patches" in responses[3].error  # fails alone
    for i in range(3):
        assert responses[i].error is None
        (alone,) = model.execute([FakeRequest(arrays[i])])
        assert responses[i].outputs["noise_pred"].shape == alone.outputs["noise_pred"].shape
        assert np.abs(responses[i].outputs["noise_pred"] - alone.outputs["noise_pred"]).max() <= tolerance


def test_python_ort_leaf_batches_requests_of_one_session_and_shape(onnx_dir, model_repository, monkeypatch):
    dims = ModelDims.from_json(json.loads((onnx_dir / "dims.json").read_text())["dims"])
    model = load_leaf_model("python_ort_leaf", monkeypatch)
    model.initialize({"model_config": json.dumps({"name": UNET, "parameters": {}}),
                      "model_repository": str(model_repository / UNET), "model_version": "1"})
    runs = []
    run = model._run
    model._run = lambda session, feeds: runs.append(len(feeds["sample"])) or run(session, feeds)
    arrays, requests = unet_requests(dims, seed=3)
    check_leaf_responses(model, arrays, requests, tolerance=0.0)  # ONNX Runtime: bit for bit
    assert runs[:2] == [4, 1]  # the two 8x8 pairs as one call of 4, the 8x16 one alone


def test_python_torch_leaf_batches_requests_of_one_patch_set_and_shape(tiny_checkpoint, onnx_dir, monkeypatch):
    dims = ModelDims.from_json(json.loads((onnx_dir / "dims.json").read_text())["dims"])
    model = load_leaf_model("python_torch_leaf", monkeypatch)
    spec = leaf_specs(dims)[UNET]
    model.initialize({"model_config": json.dumps({
        "name": UNET, "input": [{"name": t.name} for t in spec.inputs],
        "output": [{"name": t.name} for t in spec.outputs],
        "parameters": {"checkpoint": {"string_value": str(tiny_checkpoint)}, "device": {"string_value": "cpu"},
                       "dtype": {"string_value": "float32"}}}), "model_repository": "", "model_version": "1"})
    runs = []
    run = model._run
    model._run = lambda patches, inputs: runs.append(len(inputs["sample"])) or run(patches, inputs)
    arrays, requests = unet_requests(dims, seed=4)
    check_leaf_responses(model, arrays, requests, tolerance=1e-5)  # torch CPU kernels: ~1e-7 apart
    assert runs[:3] == [4, 1, 2]  # 8x8 pairs together, 8x16 alone, the missing LoRA's group (fails)
