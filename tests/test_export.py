"""The exporter: shipped SDXL configs, the offline CLIP tokenizer, and the written repository."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.checkpoint import CONFIG_DIR
from export.repository import BATCH_DELAY_US, NO_BATCH_DELAY, TRITON_DTYPES
from pipeline.interfaces import LEAF_MODEL_NAMES, PIPELINE_SPEC, UNET, ModelDims, leaf_max_batch, leaf_specs
from pipeline.lora import PATCHABLE_LEAVES


def test_shipped_sdxl_configs_build_sdxl_sized_modules():
    """The configs used for single-file checkpoints instantiate SDXL base 1.0's exact architectures
    (parameter counts of the published checkpoint's components)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def load(sub):
        return json.loads((CONFIG_DIR / sub / "config.json").read_text())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load("unet"))
        vae = AutoencoderKL.from_config(load("vae"))
        te1 = CLIPTextModel(CLIPTextConfig(**load("text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**load("text_encoder_2")))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, te1, te2)]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]


def test_clip_tokenizer_built_offline_gives_the_real_ids(onnx_dir):
    from pipeline.text import ClipTokenizer

    tok = ClipTokenizer(onnx_dir / "tokenizer.json")
    assert tok.ids("a photo of an astronaut riding a horse") == [320, 1125, 539, 550, 18376, 6765, 320, 4558]
    ids_l, ids_g = tok.chunks("A  Photo of an astronaut")
    assert ids_l.shape == ids_g.shape == (1, 77)
    assert list(ids_l[0, :7]) == [49406, 320, 1125, 539, 550, 18376, 49407]
    assert set(ids_l[0, 7:]) == {49407} and set(ids_g[0, 7:]) == {0}


def test_long_prompts_are_encoded_in_75_token_chunks(onnx_dir):
    from pipeline.text import ClipTokenizer

    tok = ClipTokenizer(onnx_dir / "tokenizer.json")
    ids_l, _ = tok.chunks(" ".join(["cat"] * 160))
    assert ids_l.shape == (3, 77)
    assert (ids_l[:, 0] == 49406).all() and list(ids_l[2, 1:12]) == [2368] * 10 + [49407]


@pytest.fixture(scope="module")
def repo_dims(model_repository):
    info = json.loads((model_repository / PIPELINE_SPEC.name / "1" / "model_info.json").read_text())
    return ModelDims.from_json(info["dims"])


def parse_config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_tiny_dims_read_off_the_checkpoint(repo_dims):
    assert (repo_dims.text_l_hidden, repo_dims.text_g_hidden, repo_dims.pooled_dim) == (32, 32, 32)
    assert repo_dims.vae_scaling_factor == pytest.approx(0.13025) and repo_dims.vae_scale_factor == 8
    assert repo_dims.extra["size_multiple"] == 32


@pytest.fixture(scope="module")
def repositories(model_repository, onnx_dir, tmp_path_factory):
    """The repository of every target, written from the same ONNX export."""
    from export.__main__ import write_repository_from_onnx

    out = {"python-ort": model_repository}
    for target in ("onnxruntime", "tensorrt"):
        out[target] = write_repository_from_onnx(onnx_dir, tmp_path_factory.mktemp(target) / "repo", target)
    return out


LEAF_PLATFORMS = {"python-ort": ("python", ""), "onnxruntime": ("", "onnxruntime_onnx"),
                  "tensorrt": ("", "tensorrt_plan")}


def check_batched_config(config, spec, want_max_batch: int, want_delay_us: int):
    """A leaf config with Triton's batch axis: max_batch_size from the interface, dims = the spec's
    shape past its "batch" axis ([B]-only tensors: dims [1] reshaped to []), and the dynamic
    batcher with the queue delay wanted when the leaf batches at all."""
    assert config.max_batch_size == want_max_batch
    if want_max_batch > 1:
        assert config.HasField("dynamic_batching")
        assert config.dynamic_batching.max_queue_delay_microseconds == want_delay_us
    else:
        assert not config.HasField("dynamic_batching")
    for tensors, specs in ((config.input, spec.inputs), (config.output, spec.outputs)):
        assert [t.name for t in tensors] == [t.name for t in specs]
        for cfg, want in zip(tensors, specs):
            assert model_config_pb2.DataType.Name(cfg.data_type) == TRITON_DTYPES[want.dtype]
            assert want.shape[0] == "batch"
            if len(want.shape) == 1:
                assert list(cfg.dims) == [1] and cfg.HasField("reshape") and list(cfg.reshape.shape) == []
                continue
            assert not cfg.HasField("reshape")
            assert list(cfg.dims) == [w if isinstance(w, int) else -1 for w in want.shape[1:]]


@pytest.mark.parametrize("target", list(LEAF_PLATFORMS))
@pytest.mark.parametrize("name", LEAF_MODEL_NAMES)
def test_leaf_config_and_onnx_agree_with_the_interface(name, target, repositories, repo_dims):
    repo = repositories[target]
    spec = leaf_specs(repo_dims)[name]
    config = parse_config(repo / name / "config.pbtxt")
    platforms = {LEAF_PLATFORMS[target]}
    if target == "tensorrt" and name in PATCHABLE_LEAVES:  # refittable plans may run in a python leaf
        platforms.add(("python", ""))
    assert config.name == name and (config.backend, config.platform) in platforms
    delay = 0 if name in NO_BATCH_DELAY else BATCH_DELAY_US["cpu"]  # these repositories: device cpu
    check_batched_config(config, spec, leaf_max_batch(name), delay)
    onnx_model = onnx.load(str(repo / name / "1" / "model.onnx"), load_external_data=False)
    onnx_inputs = {i.name: i for i in onnx_model.graph.input}
    onnx_outputs = {o.name: o for o in onnx_model.graph.output}
    for tensors, onnx_tensors, specs in ((config.input, onnx_inputs, spec.inputs),
                                         (config.output, onnx_outputs, spec.outputs)):
        assert [t.name for t in tensors] == [t.name for t in specs] == list(onnx_tensors)
        for want in specs:
            onnx_dims = onnx_tensors[want.name].type.tensor_type.shape.dim
            assert len(want.shape) == len(onnx_dims)
            assert onnx_dims[0].dim_param and not onnx_dims[0].dim_value  # the batch axis is dynamic
            for w, o in zip(want.shape, onnx_dims):
                if isinstance(w, int):
                    assert w == o.dim_value
                else:  # dynamic axis: symbolic in ONNX
                    assert o.dim_param and not o.dim_value


def test_refiner_leaf_batches_like_the_unet(model_repository, repo_dims):
    (refiner,) = [p.parent for p in model_repository.glob(f"{UNET}__*/config.pbtxt")]
    config = parse_config(refiner / "config.pbtxt")
    assert config.name == refiner.name
    check_batched_config(config, leaf_specs(repo_dims)[UNET], leaf_max_batch(UNET), BATCH_DELAY_US["cpu"])


def test_python_torch_leaf_configs_batch(onnx_dir, tiny_checkpoint, repo_dims, tmp_path):
    from export.repository import write_repository

    repo = write_repository(tmp_path / "repo", None, repo_dims, onnx_dir / "tokenizer.json", target="python-torch",
                            device="gpu", checkpoint_dir=tiny_checkpoint)
    for name, spec in leaf_specs(repo_dims).items():
        config = parse_config(repo / name / "config.pbtxt")
        assert config.backend == "python" and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        check_batched_config(config, spec, leaf_max_batch(name), 0 if name in NO_BATCH_DELAY else BATCH_DELAY_US["gpu"])


def test_batch_delay_option_reaches_every_batching_leaf(onnx_dir, repo_dims, tmp_path):
    from export.__main__ import main

    repo = tmp_path / "repo"
    assert main(["repository", "--onnx", str(onnx_dir), "--out", str(repo), "--target", "onnxruntime",
                 "--device", "gpu", "--batch-delay-us", "750"]) == 0
    for name, spec in leaf_specs(repo_dims).items():
        config = parse_config(repo / name / "config.pbtxt")
        check_batched_config(config, spec, leaf_max_batch(name), 0 if name in NO_BATCH_DELAY else 750)


@pytest.mark.parametrize("target", list(LEAF_PLATFORMS))
def test_pipeline_config_is_decoupled_and_the_same_for_every_target(target, repositories):
    repo = repositories[target]
    config = parse_config(repo / PIPELINE_SPEC.name / "config.pbtxt")
    assert config.model_transaction_policy.decoupled and config.backend == "python"
    assert [t.name for t in config.input] == ["task"] and [t.name for t in config.output] == ["event", "image"]
    assert (repo / PIPELINE_SPEC.name / "1" / "model.py").read_bytes() == \
        (repositories["python-ort"] / PIPELINE_SPEC.name / "1" / "model.py").read_bytes()
    # The BLS runs where the leaves do: on the GPU for TensorRT, its tensors crossing by DLPack.
    params = {k: v.string_value for k, v in config.parameters.items()}
    on_gpu = target == "tensorrt"
    assert (config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU) == on_gpu
    assert params.get("device", "cpu") == ("cuda" if on_gpu else "cpu")
    assert params.get("FORCE_CPU_ONLY_INPUT_TENSORS", "yes") == ("no" if on_gpu else "yes")


def test_tensorrt_profiles_agree_with_onnx_and_cover_fooocus_sizes(repositories, repo_dims):
    from pipeline.presets import ASPECT_RATIOS

    repo = repositories["tensorrt"]
    profiles = json.loads((repo / "trt_profiles.json").read_text())
    assert set(profiles) == set(LEAF_MODEL_NAMES)
    for name, profile in profiles.items():
        graph = onnx.load(str(repo / name / "1" / "model.onnx"), load_external_data=False).graph
        inputs = {i.name: i.type.tensor_type.shape.dim for i in graph.input}
        assert set(profile) == set(inputs), name
        for tensor, (lo, opt, hi) in profile.items():
            dims = inputs[tensor]
            assert len(lo) == len(opt) == len(hi) == len(dims)
            for a, b, c, d in zip(lo, opt, hi, dims):
                assert a <= b <= c
                if d.dim_value:
                    assert a == b == c == d.dim_value, (name, tensor)
    f = repo_dims.vae_scale_factor
    (lo, _, hi) = profiles["unet"]["sample"]
    for ratio in ASPECT_RATIOS:  # every Fooocus size, CFG batch 2, fits the UNet profile
        w, h = (int(v) for v in ratio.split("*"))
        assert lo[0] <= 2 <= hi[0] and lo[2] <= h // f <= hi[2] and lo[3] <= w // f <= hi[3], ratio
    (lo, _, hi) = profiles["vae_decoder"]["latent"]
    assert lo[2] * f <= 576 and hi[3] * f >= 1728
    for name, profile in profiles.items():  # every input's batch range holds the config's max batch
        config = parse_config(repo / name / "config.pbtxt")
        assert config.max_batch_size == leaf_max_batch(name)
        for tensor, (lo, opt, hi) in profile.items():
            assert lo[0] == 1 <= opt[0] <= config.max_batch_size <= hi[0], (name, tensor)


def test_tensorrt_build_stops_with_a_clear_error_without_tensorrt_or_gpu(repositories, tmp_path):
    from export.tensorrt import TensorRTUnavailable, build_repository_engines

    with pytest.raises(TensorRTUnavailable, match="TensorRT|GPU"):
        build_repository_engines(repositories["tensorrt"], tmp_path / "timing.cache")
    assert not list(repositories["tensorrt"].glob("*/1/model.plan"))


def test_user_styles_and_wildcards_reach_the_pipeline(onnx_dir, tmp_path):
    """A repository written with --styles-dir/--wildcards-dir passes them to the pipeline model,
    which loads them the way the BLS does (Fooocus-format style files, name.txt wildcards)."""
    from export.__main__ import write_repository_from_onnx
    from pipeline.generate import Pipeline
    from pipeline.prompts import process_prompts

    styles, wildcards = tmp_path / "styles", tmp_path / "wildcards"
    styles.mkdir()
    wildcards.mkdir()
    (styles / "my_styles.json").write_text(json.dumps(
        [{"name": "my-house-style", "prompt": "house style of {prompt}", "negative_prompt": "ugly"}]))
    (wildcards / "animal.txt").write_text("otter\n")
    repo = write_repository_from_onnx(onnx_dir, tmp_path / "repo", "python-ort", styles_dir=styles,
                                      wildcards_dir=wildcards)
    config = parse_config(repo / PIPELINE_SPEC.name / "config.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["styles_dir"] == str(styles.resolve()) and params["wildcards_dir"] == str(wildcards.resolve())
    pipeline = Pipeline.from_dir(repo / PIPELINE_SPEC.name / "1", models=None,
                                 styles_dir=params["styles_dir"], wildcards_dir=params["wildcards_dir"])
    plan = process_prompts({"prompt": "a __animal__", "negative_prompt": "",
                            "style_selections": ["My House Style"]}, 0, 1, pipeline.styles, pipeline.wildcards)
    assert plan.positive_texts[0] == "house style of a otter" and "ugly" in plan.negative_texts
