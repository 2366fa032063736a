"""FreeU v2 as runtime inputs of the UNet leaf (pipeline/freeu.py).

1. The DFT-free Fourier filter equals torch.fft's (FreeU's `Fourier_filter`, threshold 1) on random
   tensors of even, odd and size-1 sides. Tolerance: max |Δ| ≤ 1e-5·max(1, max |x|) against a
   float64 FFT reference (measured: about 5e-8 relative).
2. The whole hook on a toy (h, hsp) equals FreeU v2's formula written out here with torch.fft
   (same tolerance), and sits exactly where h has model_channels·4 or ·2 channels (checked against
   the channels diffusers' own up blocks hand to their `apply_freeu`).
3. Factors (1, 1, 1, 1) leave the UNet's output bit for bit unchanged: the torch module against the
   un-hooked diffusers call, the ONNX leaf against an ONNX export of the leaf without FreeU (same
   exporter steps). FreeU on changes the output, per sample.
4. The pipeline sends the request's factors only when `freeu_enabled`; served end to end, FreeU on
   changes the image and FreeU off ignores the factors.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.freeu import (FREEU_IDENTITY, _FreeUPreHook, FreeUState, fourier_filter, freeu_factors, freeu_v2,
                            up_block_h_channels)
from pipeline.interfaces import UNET, ModelDims, leaf_specs


def fft_filter(x: torch.Tensor, scale: float) -> torch.Tensor:
    """FreeU's Fourier_filter (threshold 1) in float64."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.double(), dim=(-2, -1)), dim=(-2, -1))
    b, c, h, w = freq.shape
    mask = torch.ones(b, c, h, w, dtype=torch.float64)
    mask[..., h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1] = scale
    return torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real


def close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> bool:
    return float((got.double() - want).abs().max()) <= 1e-5 * max(1.0, float(x.abs().max()))


@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (6, 5), (36, 28), (25, 31), (2, 3), (1, 4), (3, 1), (1, 1)])
def test_fft_free_filter_equals_the_fft_filter(hw):
    g = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    x = torch.randn(2, 3, *hw, generator=g) * 4 + 2  # a non-zero mean: the DC term matters
    for s in (0.95, 0.2, 1.7):
        assert close(fourier_filter(x, torch.tensor(s)), fft_filter(x, s), x), (hw, s)
    per_sample = fourier_filter(x, torch.tensor([0.5, 0.9]).reshape(2, 1, 1, 1))
    assert close(per_sample[:1], fft_filter(x[:1], 0.5), x) and close(per_sample[1:], fft_filter(x[1:], 0.9), x)
    assert torch.equal(fourier_filter(x, torch.tensor(1.0)), x)


def freeu_v2_formula(h, hsp, b: float, s: float):
    """ComfyUI's FreeU_V2 output-block patch for one (b, s), written out."""
    hidden_mean = h.mean(1).unsqueeze(1)
    batch = hidden_mean.shape[0]
    hidden_max = hidden_mean.view(batch, -1).max(dim=-1, keepdim=True).values
    hidden_min = hidden_mean.view(batch, -1).min(dim=-1, keepdim=True).values
    hidden_mean = (hidden_mean - hidden_min[:, :, None, None]) / (hidden_max - hidden_min)[:, :, None, None]
    h = h.clone()
    h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * ((b - 1) * hidden_mean + 1)
    return h, fft_filter(hsp, s)


@pytest.mark.parametrize("stage", [0, 1])
def test_hook_applies_freeu_v2_as_the_formula(stage):
    g = torch.Generator().manual_seed(7 + stage)
    h, hsp, temb = torch.randn(2, 8, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g) + 1, torch.randn(2, 3)
    factors = torch.tensor([[1.3, 1.4, 0.9, 0.2], [1.01, 1.02, 0.99, 0.95]])
    state = FreeUState()
    hook = _FreeUPreHook(state, h_channels=8, stage=stage)
    assert hook(None, (torch.cat([h, hsp], 1), temb)) is None  # outside a UNet call: nothing changes
    state.factors = factors
    out, temb_out = hook(None, (torch.cat([h, hsp], 1), temb))
    assert temb_out is temb
    for i in range(2):
        want_h, want_hsp = freeu_v2_formula(h[i:i + 1], hsp[i:i + 1], float(factors[i, stage]),
                                            float(factors[i, 2 + stage]))
        assert close(out[i:i + 1, :8], want_h.double(), h) and close(out[i:i + 1, 8:], want_hsp, hsp)


def test_identity_factors_are_exact_and_a_constant_mean_gives_no_nan():
    g = torch.Generator().manual_seed(3)
    h, hsp = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    ones = torch.ones(2)
    out_h, out_hsp = freeu_v2(h, hsp, ones, ones)
    assert torch.equal(out_h, h) and torch.equal(out_hsp, hsp)
    flat = torch.full((2, 6, 4, 4), 0.5)  # min == max of the channel mean: ComfyUI divides by zero
    out_h, _ = freeu_v2(flat, hsp, torch.full((2,), 1.3), torch.full((2,), 0.9))
    assert torch.isfinite(out_h).all() and torch.equal(out_h, flat)


def test_freeu_factors_follow_the_request():
    from pipeline.task import GenerationTask

    def factors(**adv):
        (row,) = freeu_factors(GenerationTask.from_dict({"advanced_params": adv})).tolist()
        return row

    assert factors() == list(FREEU_IDENTITY) and freeu_factors(None).tolist() == [list(FREEU_IDENTITY)]
    assert factors(freeu_b1=1.5, freeu_s2=0.1) == list(FREEU_IDENTITY)  # off: the factors are ignored
    assert factors(freeu_enabled=True) == pytest.approx([1.01, 1.02, 0.99, 0.95])
    assert factors(freeu_enabled=True, freeu_b1=1.3, freeu_b2=1.4, freeu_s1=0.9, freeu_s2=0.2) == \
        pytest.approx([1.3, 1.4, 0.9, 0.2])
    assert freeu_factors(None).dtype == torch.float32


def test_sdxl_hooks_sit_on_the_1280_and_640_channel_inputs():
    import json
    from pathlib import Path
    from types import SimpleNamespace

    config = json.loads((Path(__file__).parent.parent / "export/configs/sdxl_base/unet/config.json").read_text())
    channels = up_block_h_channels(SimpleNamespace(**config))
    assert channels == [[1280, 1280, 1280], [1280, 640, 640], [640, 320, 320]]


# --- the UNet leaf ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet_leaf(tiny_checkpoint):
    from export.checkpoint import load_checkpoint, model_dims
    from pipeline.torch_leaves import UNet

    components = load_checkpoint(tiny_checkpoint)
    return UNet(components.unet).eval(), model_dims(components)


def plain_unet(leaf, inputs):
    """The diffusers UNet (with the inpaint head) called without FreeU's factors: hooks idle."""
    assert leaf.freeu_state.factors is None
    return leaf.model(torch.cat([inputs["sample"], inputs["inpaint_latent"]], 1), inputs["timestep"],
                      inputs["encoder_hidden_states"],
                      added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
                      return_dict=False)[0]


def test_hooks_match_the_channels_diffusers_hands_to_its_up_blocks(unet_leaf, monkeypatch):
    """diffusers' up blocks call their module-level `apply_freeu(resolution_idx, h, hsp)` once per
    resnet when b1..s2 are set: a spy there sees the real h entering every resnet."""
    import diffusers.models.unets.unet_2d_blocks as blocks
    from export.onnx_export import example_inputs

    leaf, dims = unet_leaf
    seen = []
    monkeypatch.setattr(blocks, "apply_freeu", lambda idx, h, hsp, **kw: (seen.append((idx, h.shape[1])), (h, hsp))[1])
    for block in leaf.model.up_blocks:
        monkeypatch.setattr(block, "s1", 1.0, raising=False)
        for name in ("s2", "b1", "b2"):
            monkeypatch.setattr(block, name, 1.0, raising=False)
    with torch.no_grad():
        plain_unet(leaf, example_inputs(UNET, dims, batch=1, latent_hw=(8, 8), chunks=1))
    expected = up_block_h_channels(leaf.model.config)
    assert seen == [(i, c) for i, block in enumerate(expected) for c in block]
    m = leaf.model.config.block_out_channels[0]
    hooked = [[bool(r._forward_pre_hooks) for r in block.resnets] for block in leaf.model.up_blocks]
    assert hooked == [[c in (4 * m, 2 * m) for c in block] for block in expected]
    assert hooked == [[True] * 3, [True] * 3, [True, False, False]]  # tiny: h of 64 or 32 channels (of 16)


def test_identity_factors_leave_the_torch_unet_bit_identical(unet_leaf):
    from export.onnx_export import example_inputs

    leaf, dims = unet_leaf
    inputs = example_inputs(UNET, dims, batch=2, latent_hw=(20, 28), chunks=1)  # odd sides in the up blocks
    spec = leaf_specs(dims)[UNET]
    with torch.no_grad():
        plain = plain_unet(leaf, inputs)
        inputs["freeu"] = torch.ones(2, 4)
        identity = leaf(*[inputs[t.name] for t in spec.inputs])
        inputs["freeu"] = torch.tensor([FREEU_IDENTITY, [1.3, 1.4, 0.9, 0.2]])
        mixed = leaf(*[inputs[t.name] for t in spec.inputs])
    assert torch.equal(identity, plain)
    assert torch.equal(mixed[0], plain[0])  # the factors are per sample
    assert float((mixed[1] - plain[1]).abs().max()) > 1e-2


@pytest.fixture(scope="module")
def onnx_without_freeu(unet_leaf, tmp_path_factory):
    """The UNet leaf exported as before FreeU (no `freeu` input), by export_onnx's steps."""
    from export.onnx_export import _dynamic_shapes, example_inputs, optimize_keeping_parameters
    from pipeline.torch_leaves import UNet

    class UNetWithoutFreeU(UNet):
        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, inpaint_latent):
            return self.model(torch.cat([sample, inpaint_latent], 1), timestep, encoder_hidden_states,
                              added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                              return_dict=False)[0]

    leaf, dims = unet_leaf
    module = UNetWithoutFreeU(leaf.model).eval()
    names = [t.name for t in leaf_specs(dims)[UNET].inputs if t.name != "freeu"]
    inputs = example_inputs(UNET, dims)
    shapes = {k: v for k, v in _dynamic_shapes(UNET, dims).items() if k != "freeu"}
    with torch.no_grad():
        program = torch.onnx.export(module, tuple(inputs[n] for n in names), None, dynamo=True, input_names=names,
                                    output_names=["noise_pred"], dynamic_shapes=shapes, optimize=False,
                                    verbose=False)
    optimize_keeping_parameters(program.model, {n for n, _ in module.named_parameters()})
    path = tmp_path_factory.mktemp("unet_without_freeu") / "unet.onnx"
    program.save(str(path))
    return path


def test_identity_factors_leave_the_onnx_unet_bit_identical(unet_leaf, onnx_dir, onnx_without_freeu):
    import onnxruntime as ort

    from export.onnx_export import example_inputs

    _, dims = unet_leaf
    with_freeu = ort.InferenceSession(str(onnx_dir / "unet.onnx"), providers=["CPUExecutionProvider"])
    without = ort.InferenceSession(str(onnx_without_freeu), providers=["CPUExecutionProvider"])
    assert [i.name for i in with_freeu.get_inputs()][-1] == "freeu"
    for hw in ((24, 32), (20, 28)):
        feeds = {k: v.numpy() for k, v in example_inputs(UNET, dims, batch=2, latent_hw=hw, chunks=1).items()}
        reference = without.run(None, {k: v for k, v in feeds.items() if k != "freeu"})[0]
        feeds["freeu"] = np.ones((2, 4), np.float32)
        assert np.array_equal(with_freeu.run(None, feeds)[0], reference), hw
        feeds["freeu"] = np.array([FREEU_IDENTITY, [1.01, 1.02, 0.99, 0.95]], np.float32)
        on = with_freeu.run(None, feeds)[0]
        assert np.array_equal(on[0], reference[0]) and np.abs(on[1] - reference[1]).max() > 1e-3, hw


def test_onnx_unet_stays_tensorrt_friendly(onnx_dir):
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_dir / "unet.onnx"), load_external_data=False))
    graph = model.graph
    assert not {n.op_type for n in graph.node} & {"DFT", "STFT"}  # TensorRT has no DFT layer
    # FreeU's cos/sin bases come from Range over the runtime H, W: integer Range (a shape
    # computation for TensorRT), cast to float afterwards.
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input)}
    types.update({t.name: t.data_type for t in graph.initializer})
    ranges = [n for n in graph.node if n.op_type == "Range"]
    assert ranges and all(types.get(i) == onnx.TensorProto.INT64 for n in ranges for i in n.input)


# --- the pipeline ----------------------------------------------------------------------------------

def test_denoiser_sends_the_factors_to_every_unet_call(onnx_dir):
    from pipeline.generate import Pipeline
    from pipeline.task import GenerationTask
    from pipeline.text import ClipTokenizer
    from tests.test_guidance import RecordingModels

    dims = ModelDims(text_l_hidden=4, text_l_layers=2, text_g_hidden=4, text_g_layers=2, pooled_dim=4,
                     extra={"size_multiple": 32})
    models = RecordingModels()
    pipeline = Pipeline(models, ClipTokenizer(onnx_dir / "tokenizer.json"), dims)
    for adv, want in (({}, FREEU_IDENTITY), ({"freeu_enabled": True, "freeu_b1": 1.3}, (1.3, 1.02, 0.99, 0.95))):
        models.unet_calls.clear()
        pipeline.run(GenerationTask.from_dict({"prompt": "a cat", "aspect_ratios_selection": "256*192",
                                               "image_seed": 1, "advanced_params": {"overwrite_step": 2, **adv}}),
                     lambda event, image: None)
        assert len(models.unet_calls) == 2
        for call in models.unet_calls:
            assert call["freeu"].shape == (2, 4) and call["freeu"].dtype == torch.float32  # CFG batch of 2
            assert call["freeu"].tolist() == [pytest.approx(list(want))] * 2


def test_served_freeu_changes_the_image_only_when_enabled(served):
    def image(**adv):
        r = served.client.post("/v1/generation/text-to-image", json={
            "prompt": "a lighthouse at dusk", "aspect_ratios_selection": "256*256", "image_seed": 99,
            "advanced_params": {"overwrite_step": 2, **adv}})
        (result,) = r.json()
        assert result["finish_reason"] == "SUCCESS", result
        return np.asarray(Image.open(io.BytesIO(served.client.get(result["url"][len(served.base_url):]).content)),
                          dtype=int)

    default = image()
    assert np.array_equal(image(freeu_b1=1.4, freeu_b2=1.6, freeu_s1=0.5, freeu_s2=0.2), default)
    assert np.abs(image(freeu_enabled=True) - default).max() > 0
    assert np.abs(image(freeu_enabled=True, freeu_b1=1.4, freeu_b2=1.6, freeu_s1=0.5, freeu_s2=0.2)
                  - default).max() > 10
