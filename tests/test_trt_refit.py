"""The tensorrt target's weight patches by refit (pipeline.trt_runtime, python_trt_leaf), on the CPU:
everything up to the point that needs TensorRT and a GPU.

- `refit_weights` gives exactly the initializers and values the python-ort leaf binds to ONNX
  Runtime for the same patch set (PatchedSessions), for the tiny UNet and both text encoders;
- `load_refit_weights` against a stand-in refitter (names, counts and a fused q/k/v group like the
  ones TensorRT reports) loads those values plus the fused partners' exported values, and the ONNX
  model carrying every loaded weight computes what the python-ort leaf computes (parity of the
  weights a refit loads);
- the engine wrapper and the leaf model stop with TensorRTUnavailable here; the leaf's request
  handling (patch parameter, a broken patch set failing its request only, counters, DLPack
  outputs) runs with a CPU stand-in for its engines;
- the tensorrt repository writes the patchable leaves as python_trt leaves and builds them refittable.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from onnx import numpy_helper
from tritonclient.grpc import model_config_pb2

from export import tiny_patches
from export.onnx_export import example_inputs
from export.repository import PROJECT_MODELS, TRITON_DTYPES
from pipeline import lora
from pipeline.errors import TensorRTUnavailable
from pipeline.interfaces import INPAINT_HEAD_PARAM, TEXT_ENCODER_G, TEXT_ENCODER_L, UNET, ModelDims, leaf_specs
from pipeline.lora import FOOOCUS_PATCH, INPAINT_HEAD, LORA, Patch
from pipeline.models import PatchedSessions, ort_session
from pipeline.trt_runtime import (RefitError, RefittedEngines, load_refit_weights, onnx_base_values, refit_role,
                                  refit_weights)

LEAVES = (TEXT_ENCODER_L, TEXT_ENCODER_G, UNET)
LEAF_MODEL = PROJECT_MODELS / "python_trt_leaf" / "1" / "model.py"


@pytest.fixture(scope="module")
def dims(onnx_dir):
    return ModelDims.from_json(json.loads((onnx_dir / "dims.json").read_text())["dims"])


@pytest.fixture(scope="module")
def patch_files(tmp_path_factory, tiny_checkpoint):
    folder = tmp_path_factory.mktemp("trt_patches")
    files = {"kohya": folder / "k.safetensors", "patch": folder / "inpaint.fooocus.patch",
             "head": folder / "fooocus_inpaint_head.pth"}
    deltas = {"kohya": tiny_patches.save_kohya_lora(files["kohya"], tiny_checkpoint),
              "patch": tiny_patches.save_fooocus_patch(files["patch"], tiny_checkpoint),
              "head": tiny_patches.save_inpaint_head(files["head"], tiny_checkpoint)}
    return files, deltas


def patch_set(files):
    return lora.canonical([Patch(LORA, str(files["kohya"]), 0.7), Patch(FOOOCUS_PATCH, str(files["patch"]), 1.0),
                           Patch(INPAINT_HEAD, str(files["head"]), 1.0)])


def initializers(path: Path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def run_onnx(session, leaf, dims) -> dict[str, np.ndarray]:
    inputs = example_inputs(leaf, dims, batch=1, latent_hw=(16, 24), chunks=1)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: v.numpy() for k, v in inputs.items()})))


def model_with(path: Path, weights: dict[str, np.ndarray]) -> bytes:
    """The ONNX model with these initializers replaced: what an engine refitted with them computes."""
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(weights[tensor.name], np.float32), tensor.name))
    return model.SerializeToString()


@pytest.mark.parametrize("leaf", LEAVES)
def test_refit_weights_are_the_initializers_python_ort_binds(leaf, onnx_dir, patch_files):
    files, deltas = patch_files
    path = onnx_dir / f"{leaf}.onnx"
    patches = patch_set(files)
    got = refit_weights(leaf, patches, path)
    inits = initializers(path)
    assert got and set(got) <= set(inits)
    for name, value in got.items():
        assert value.dtype == np.float32 and value.flags.c_contiguous and value.shape == tuple(inits[name].dims)
    # the names the tiny patch files encode for this leaf, at their weights
    want = {n: 0.7 * d for n, d in deltas["kohya"].get(leaf, {}).items()}
    if leaf == UNET:
        for name, d in deltas["patch"][UNET].items():
            want[name] = want.get(name, 0) + d
        want[INPAINT_HEAD_PARAM] = deltas["head"][UNET][INPAINT_HEAD_PARAM]
    assert set(got) == set(want)
    base = onnx_base_values(path)
    for name, value in got.items():
        expected = want[name].numpy() if name == INPAINT_HEAD_PARAM else base(name) + want[name].numpy()
        np.testing.assert_allclose(value, expected, rtol=0, atol=1e-5)
    # bit for bit what the python-ort leaf merges and binds for the same patch set
    sessions = PatchedSessions(path, leaf, threads=1)
    sessions.session(patches)
    (_, bound), result = sessions.cache.get(lora.for_leaf(leaf, patches), lambda: pytest.fail("not cached"))
    assert result == "hit" and set(bound) == set(got)
    for name, value in bound.items():
        assert np.array_equal(value.numpy(), got[name]), name


def test_refit_weights_of_a_patch_set_that_misses_the_leaf_are_empty(onnx_dir, patch_files):
    files, _ = patch_files
    unet_only = (Patch(FOOOCUS_PATCH, str(files["patch"])),)
    assert refit_weights(TEXT_ENCODER_L, unet_only, onnx_dir / "text_encoder_l.onnx") == {}
    assert refit_weights(UNET, (), onnx_dir / "unet.onnx") == {}


class StandInRefitter:
    """What the refit code sees of a `trt.Refitter`: every initializer refittable under its name,
    counts and types through prototypes, and weights TensorRT fused (e.g. q/k/v into one GEMM),
    which become missing once one of them is set."""

    def __init__(self, path: Path, fused: list[tuple[str, ...]]):
        self.counts = {n: int(np.prod(t.dims)) for n, t in initializers(path).items()}
        self.fused, self.loaded, self.refitted = fused, {}, False

    def get_all_weights(self):
        return list(self.counts)

    def get_weights_prototype(self, name):
        return types.SimpleNamespace(size=self.counts.get(name, -1), dtype="float32")

    def set_named_weights(self, name, weights):
        if name not in self.counts or weights.size != self.counts[name]:
            return False
        self.loaded[name] = weights
        return True

    def get_missing_weights(self):
        return [n for group in self.fused if any(g in self.loaded for g in group) for n in group
                if n not in self.loaded]

    def refit_cuda_engine(self):
        self.refitted = not self.get_missing_weights()
        return self.refitted


@pytest.mark.parametrize("leaf", LEAVES)
def test_refit_loads_the_weights_python_ort_runs(leaf, onnx_dir, dims, patch_files):
    files, _ = patch_files
    path = onnx_dir / f"{leaf}.onnx"
    patches = patch_set(files)
    updates = refit_weights(leaf, patches, path)
    names = set(initializers(path))
    fused = []
    for name in updates:  # every patched attention projection fused with its two siblings
        for a, b, c in (("to_q", "to_k", "to_v"), ("q_proj", "k_proj", "v_proj")):
            for own in (a, b, c):
                if f".{own}." in name:
                    group = tuple(name.replace(f".{own}.", f".{x}.") for x in (a, b, c))
                    if set(group) <= names:
                        fused.append(group)
    assert fused  # the tiny patches touch at least one projection of each leaf
    refitter = StandInRefitter(path, fused)
    loaded = load_refit_weights(refitter, updates, onnx_base_values(path), make_weights=lambda a: a, nptype=np.dtype)
    assert refitter.refitted and loaded.keys() == refitter.loaded.keys()
    partners = {n for g in fused for n in g} - set(updates)
    assert partners and set(loaded) == set(updates) | partners
    base = onnx_base_values(path)
    for name in partners:  # supplied with their exported values
        assert np.array_equal(loaded[name], base(name))
    # parity: the model carrying every weight the refit loaded computes what the python-ort leaf does
    want = run_onnx(PatchedSessions(path, leaf, threads=1).session(patches), leaf, dims)
    got = run_onnx(ort_session(model_with(path, loaded), threads=1), leaf, dims)
    plain = run_onnx(ort_session(path, threads=1), leaf, dims)
    changed = 0.0
    for name, w in want.items():
        assert np.abs(got[name] - w).max() <= 1e-5 * max(1.0, np.abs(w).max()), name
        changed = max(changed, float(np.abs(w - plain[name]).max()))
    assert changed > 0.05  # the patches matter, so a weight left out would show


def test_refit_names_a_weight_the_plan_cannot_refit(onnx_dir, patch_files):
    files, _ = patch_files
    path = onnx_dir / "unet.onnx"
    updates = refit_weights(UNET, patch_set(files), path)
    refitter = StandInRefitter(path, [])
    gone = sorted(updates)[0]
    del refitter.counts[gone]  # e.g. folded by TensorRT into an unnamed weight
    with pytest.raises(RefitError, match=f"no refittable weight '{gone}'"):
        load_refit_weights(refitter, updates, onnx_base_values(path), make_weights=lambda a: a, nptype=np.dtype)
    refitter = StandInRefitter(path, [])
    refitter.counts[gone] += 1  # a plan from another export of the checkpoint
    with pytest.raises(RefitError, match=f"'{gone}': the plan's weight has"):
        load_refit_weights(refitter, updates, onnx_base_values(path), make_weights=lambda a: a, nptype=np.dtype)
    assert not refitter.refitted


def test_engines_stop_with_a_clear_error_without_tensorrt_or_gpu(tmp_path, onnx_dir):
    if torch.cuda.is_available() and importlib.util.find_spec("tensorrt"):
        pytest.skip("TensorRT and a GPU are here")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a plan")
    with pytest.raises(TensorRTUnavailable, match="TensorRT|GPU"):
        RefittedEngines(plan, onnx_dir / "unet.onnx", UNET)


# --- the python_trt leaf model ----------------------------------------------------------------------


def fake_pb_utils():
    pb = types.ModuleType("triton_python_backend_utils")

    class Metric:
        def __init__(self, labels):
            self.labels, self.value = labels, 0

        def increment(self, n):
            self.value += n

    class MetricFamily:
        COUNTER = "counter"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels):  # noqa: N802 (Triton's name)
            return Metric(labels)

    class Tensor:
        def __init__(self, name, value):
            self.name, self.value = name, value

        @staticmethod
        def from_dlpack(name, value):
            return Tensor(name, torch.from_dlpack(value))

        def to_dlpack(self):
            return torch.utils.dlpack.to_dlpack(self.value)

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs, self.error = {t.name: t.value for t in output_tensors}, error

    pb.MetricFamily, pb.Tensor, pb.InferenceResponse = MetricFamily, Tensor, InferenceResponse
    pb.TritonError = lambda message: message
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    return pb


@pytest.fixture
def leaf_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    spec = importlib.util.spec_from_file_location("python_trt_leaf_model", LEAF_MODEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaf_args(repo: Path, name: str) -> dict:
    config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    from google.protobuf import json_format

    return {"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
            "model_repository": str(repo / name), "model_version": "1", "model_instance_device_id": "0"}


@pytest.fixture(scope="module")
def trt_repository(onnx_dir, tmp_path_factory):
    from export.__main__ import write_repository_from_onnx

    return write_repository_from_onnx(onnx_dir, tmp_path_factory.mktemp("trt") / "repo", "tensorrt",
                                      refiners={"other.safetensors": onnx_dir / "refiner"})


def test_leaf_model_stops_with_a_clear_error_without_tensorrt_or_gpu(leaf_module, trt_repository):
    if torch.cuda.is_available() and importlib.util.find_spec("tensorrt"):
        pytest.skip("TensorRT and a GPU are here")
    (trt_repository / UNET / "1" / "model.plan").write_bytes(b"")
    try:
        with pytest.raises(TensorRTUnavailable, match="TensorRT|GPU"):
            leaf_module.TritonPythonModel().initialize(leaf_args(trt_repository, UNET))
    finally:
        (trt_repository / UNET / "1" / "model.plan").unlink()


class CpuEngines:
    """RefittedEngines' interface over ONNX Runtime (the python-ort leaf's sessions): the leaf
    model's request handling runs on the CPU."""

    made = []

    def __init__(self, plan_path, onnx_path, leaf, cache_size=None, device=None):
        self.sessions = PatchedSessions(onnx_path, leaf, threads=1, cache_size=cache_size)
        self.leaf, self.device, self.last = leaf, device, "base"
        self.engines, self.calls = {}, []  # one engine object per session; batch of each call
        CpuEngines.made.append(self)

    def engine(self, patches=()):
        session = self.sessions.session(patches)
        self.last = self.sessions.last
        names = [o.name for o in session.get_outputs()]

        def run(inputs):
            self.calls.append(len(next(iter(inputs.values()))))
            out = session.run(names, {k: v.numpy() for k, v in inputs.items()})
            return {n: torch.from_numpy(v) for n, v in zip(names, out)}

        return self.engines.setdefault(id(session), run)


def test_leaf_model_serves_requests_with_and_without_patches(leaf_module, trt_repository, dims, patch_files,
                                                             monkeypatch):
    monkeypatch.setattr(leaf_module, "RefittedEngines", CpuEngines)
    files, _ = patch_files
    leaf = "unet__other"
    model = leaf_module.TritonPythonModel()
    model.initialize(leaf_args(trt_repository, leaf))
    engines = CpuEngines.made[-1]
    assert (engines.leaf, engines.device) == (UNET, "cuda:0")  # the refiner's role
    inputs = example_inputs(UNET, dims, batch=1, latent_hw=(16, 24), chunks=1)
    pb = sys.modules["triton_python_backend_utils"]

    def request(patches):
        params = {"weight_patches": lora.to_json(patches)} if patches is not None else {}
        return types.SimpleNamespace(inputs={n: pb.Tensor(n, t) for n, t in inputs.items()},
                                     parameters=lambda: json.dumps(params))

    patches = patch_set(files)
    broken = (Patch(INPAINT_HEAD, str(files["kohya"])),)  # not an inpaint head
    plain, patched, bad, again = model.execute([request(None), request(patches), request(broken), request(patches)])
    assert plain.error is None and patched.error is None and again.error is None
    assert "weight patches" in bad.error and "inpaint head" in bad.error
    assert set(plain.outputs) == {"noise_pred"} and plain.outputs["noise_pred"].dtype == torch.float32
    assert torch.equal(patched.outputs["noise_pred"], again.outputs["noise_pred"])
    assert (patched.outputs["noise_pred"] - plain.outputs["noise_pred"]).abs().max() > 0.05
    assert {r: m.value for r, m in model.lookups.items()} == {"base": 1, "hit": 1, "miss": 1}
    assert sorted(engines.calls) == [1, 2]  # the two requests with the same patch set ran as one call


# --- the repository and the engine build ------------------------------------------------------------


def parse_config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_tensorrt_repository_serves_patchable_leaves_by_python_trt(trt_repository, dims):
    specs = leaf_specs(dims)
    leaves = {name: name for name in specs} | {"unet__other": UNET}
    profiles = json.loads((trt_repository / "trt_profiles.json").read_text())
    for name, role in leaves.items():
        config = parse_config(trt_repository / name / "config.pbtxt")
        version = trt_repository / name / "1"
        if refit_role(name) is None:
            assert config.platform == "tensorrt_plan" and not config.backend and not (version / "model.py").exists()
            continue
        assert refit_role(name) == role and (config.backend, config.platform) == ("python", "")
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params == {"leaf": role, "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
        assert (version / "model.py").read_bytes() == LEAF_MODEL.read_bytes()
        assert (version / "model.onnx").is_file()  # the plan is built from it, and refits read it
        spec, batched = specs[role], config.max_batch_size > 0  # the batch axis is Triton's
        for tensors, want in ((config.input, spec.inputs), (config.output, spec.outputs)):
            assert [t.name for t in tensors] == [t.name for t in want]
            for cfg, w in zip(tensors, want):
                assert model_config_pb2.DataType.Name(cfg.data_type) == TRITON_DTYPES[w.dtype]
                shape = [d if isinstance(d, int) else -1 for d in (w.shape[1:] if batched else w.shape)]
                assert list(cfg.dims) == (shape or [1])
        for tensor, (lo, _, hi) in profiles[name].items():  # the plan takes every batch Triton may form
            assert lo[0] == 1 and hi[0] >= max(config.max_batch_size, 1), (name, tensor)
    assert {n for n in leaves if refit_role(n)} == {TEXT_ENCODER_L, TEXT_ENCODER_G, UNET, "unet__other"}


def test_engine_build_makes_the_patchable_leaves_refittable(trt_repository, tmp_path, monkeypatch):
    from export import tensorrt

    built = {}
    monkeypatch.setattr(tensorrt, "_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt, "build_engine", lambda onnx_path, plan_path, profile, *, fp16, refittable,
                        timing_cache: built.setdefault(onnx_path.parent.parent.name, (refittable, fp16)))
    tensorrt.build_repository_engines(trt_repository, tmp_path / "timing.cache")
    assert {name for name, (refittable, _) in built.items() if refittable} == {
        TEXT_ENCODER_L, TEXT_ENCODER_G, UNET, "unet__other"}
    assert built["vae_decoder"] == (False, False)
