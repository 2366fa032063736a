"""Export SDXL components to ONNX with the tensor interfaces of `pipeline.interfaces`, using
torch's dynamo exporter (opset 20) with dynamic batch, sequence and spatial axes."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pipeline.interfaces import (PROMPT_EXPANSION, TEXT_ENCODER_G, TEXT_ENCODER_L, TOKENS_PER_CHUNK, UNET,
                                 UPSCALER, VAE_DECODER, VAE_ENCODER, ModelDims, leaf_specs)
from pipeline.lora import PATCHABLE_LEAVES
from pipeline.torch_leaves import torch_modules as checkpoint_modules

from .checkpoint import SDXLComponents

log = logging.getLogger(__name__)


def torch_modules(c, dims: ModelDims | None = None) -> dict[str, torch.nn.Module]:
    """The checkpoint's leaf modules, plus the checkpoint-independent `upscaler` (Real-ESRGAN x4plus,
    `export.realesrgan`) unless `dims` says the export has none."""
    modules = checkpoint_modules(c)
    if dims is None or UPSCALER in leaf_specs(dims):
        from .realesrgan import upscaler_module

        modules[UPSCALER] = upscaler_module()
    return modules


def example_inputs(name: str, dims: ModelDims, batch: int = 2, latent_hw=(16, 24), chunks: int = 2
                   ) -> dict[str, torch.Tensor]:
    """Inputs shaped like a real call (also used by the parity tests)."""
    g = torch.Generator().manual_seed(1234)
    h, w = latent_hw
    c = dims.latent_channels
    if name in (TEXT_ENCODER_L, TEXT_ENCODER_G):
        ids = torch.randint(0, 49406, (batch, TOKENS_PER_CHUNK), generator=g)
        ids[:, 0], ids[:, -1] = 49406, 49407
        return {"input_ids": ids}
    if name == UNET:
        return {
            "sample": torch.randn(batch, c, h, w, generator=g),
            "timestep": torch.full((batch,), 500.0),
            "encoder_hidden_states": torch.randn(batch, TOKENS_PER_CHUNK * chunks, dims.context_dim, generator=g),
            "text_embeds": torch.randn(batch, dims.pooled_dim, generator=g),
            "time_ids": torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * batch, dtype=torch.float32),
            "inpaint_latent": torch.randn(batch, c + 1, h, w, generator=g),
            # FreeU factors around Fooocus's defaults (b1, b2, s1, s2), different per sample
            "freeu": torch.tensor([1.01, 1.02, 0.99, 0.95]) + 0.05 * torch.randn(batch, 4, generator=g),
        }
    if name == VAE_ENCODER:
        return {"image": torch.rand(batch, 3, h * dims.vae_scale_factor, w * dims.vae_scale_factor, generator=g) * 2 - 1}
    if name == VAE_DECODER:
        return {"latent": torch.randn(batch, c, h, w, generator=g)}
    if name == UPSCALER:  # latent_hw is the image size here: the network is large, tiles are small
        return {"image": torch.rand(batch, 3, h, w, generator=g)}
    if name == PROMPT_EXPANSION:  # the sequence length differs with the batch: export 2x16, parity 1x13
        return {"input_ids": torch.randint(0, int(dims.expansion_vocab) - 2, (batch, 10 + 3 * batch), generator=g)}
    raise KeyError(name)


def _dynamic_shapes(name: str, dims: ModelDims) -> dict:
    from torch.export import Dim

    multiple = int(dims.extra.get("size_multiple", 8)) // dims.vae_scale_factor  # latent multiple
    batch = Dim("batch", min=1, max=64)
    lh, lw = Dim("lh", min=1, max=512), Dim("lw", min=1, max=512)
    latent = {0: batch, 2: multiple * lh, 3: multiple * lw}
    if name in (TEXT_ENCODER_L, TEXT_ENCODER_G):
        return {"input_ids": {0: batch}}
    if name == UNET:
        return {"sample": latent, "timestep": {0: batch},
                "encoder_hidden_states": {0: batch, 1: TOKENS_PER_CHUNK * Dim("chunks", min=1, max=16)},
                "text_embeds": {0: batch}, "time_ids": {0: batch}, "inpaint_latent": latent,
                "freeu": {0: batch}}
    if name == VAE_ENCODER:
        f = dims.vae_scale_factor * multiple
        return {"image": {0: batch, 2: f * Dim("ih", min=1, max=512), 3: f * Dim("iw", min=1, max=512)}}
    if name == VAE_DECODER:
        return {"latent": latent}
    if name == UPSCALER:  # any image size: the pipeline feeds tiles of up to 512x512
        return {"image": {0: batch, 2: Dim("height", min=2, max=4096), 3: Dim("width", min=2, max=4096)}}
    if name == PROMPT_EXPANSION:  # the dynamo exporter: the legacy one exports GPT-2 wrongly
        return {"input_ids": {0: batch, 1: Dim("sequence", min=2, max=dims.expansion_positions)}}
    raise KeyError(name)


def optimize_keeping_parameters(model, parameters: set[str]) -> None:
    """onnxscript's optimizer as `torch.onnx.export(optimize=True)` runs it (inlining, constant
    folding, its rewrite rules, dead-node removal, constant lifting, CSE), minus what hides
    weights: folding computations on a parameter (e.g. the Transpose of every Linear weight) into
    an anonymous initializer, and merging equal small initializers. Every torch parameter the
    graph uses stays an initializer under its parameter name and in its torch layout, so weight
    patches (pipeline.lora) can replace it by name (ONNX Runtime's `add_initializer`, TensorRT's
    refitter). ONNX Runtime folds those Transposes itself when it loads the model, overridden
    values included: the optimized graphs it runs are the same (docs/architecture.md)."""
    import onnx_ir.passes.common as common
    from onnxscript import ir, optimizer, rewriter

    def used_parameters():
        return {v.name for v in model.graph.initializers.values() if v.name in parameters and v.uses()}

    def should_fold(node):
        if node.op_type in ("Shape", "Size"):  # shapes of weights are static: fold as usual
            return None
        if any(v is not None and v.is_initializer() and v.name in parameters for v in node.inputs):
            return False
        return None

    optimizer.inline(model)
    common.RemoveUnusedNodesPass()(model)  # parameters only dead code reads may go
    before = used_parameters()
    for _ in range(2):
        optimizer.fold_constants(model, onnx_shape_inference=True, should_fold=should_fold)
        rewriter.rewrite(model)
        optimizer.remove_unused_nodes(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
    lost = before - used_parameters()
    if lost:
        raise RuntimeError(f"the ONNX optimizer folded parameters away: {sorted(lost)[:5]} ...")


def export_onnx(c: SDXLComponents | None, dims: ModelDims, out_dir: Path, names=None,
                modules: dict[str, torch.nn.Module] | None = None) -> dict[str, Path]:
    """Write `<out_dir>/<leaf>.onnx` for each leaf model; returns the paths. `modules` (leaf name ->
    torch module) instead of `c` exports just those leaves (e.g. the expansion alone)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = leaf_specs(dims)
    modules = modules if modules is not None else torch_modules(c, dims)
    paths = {}
    for name in names or specs:
        spec = specs[name]
        inputs = example_inputs(name, dims)
        path = out_dir / f"{name}.onnx"
        t0 = time.time()
        with torch.no_grad():
            program = torch.onnx.export(
                modules[name], tuple(inputs[t.name] for t in spec.inputs), None, dynamo=True,
                input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                dynamic_shapes=_dynamic_shapes(name, dims), external_data=False, verbose=False,
                # Leaves that take weight patches keep their parameters addressable (see below).
                optimize=name not in PATCHABLE_LEAVES,
            )
        if name in PATCHABLE_LEAVES:
            optimize_keeping_parameters(program.model, {n for n, _ in modules[name].named_parameters()})
        weight_bytes = sum(p.numel() * p.element_size() for p in modules[name].parameters())
        program.save(str(path), external_data=weight_bytes > 2**30)  # protobuf's 2 GB limit
        log.info("exported %s in %.1f s (%.1f MB)", name, time.time() - t0, path.stat().st_size / 1e6)
        paths[name] = path
    return paths
