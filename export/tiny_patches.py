"""Tiny seeded weight-patch files for the tiny SDXL checkpoint (`export.tiny`): LoRAs in kohya and
diffusers/peft format, a Fooocus inpaint patch (`.fooocus.patch`, ldm UNet keys) and an inpaint
head, for tests and demos. Nothing is downloaded; every tensor is drawn from a seeded generator.

Each writer returns the weight changes it encodes at weight 1, by leaf parameter name
({leaf: {name: delta}}; for the inpaint head the new value), computed here from the file's own
tensors with the formulas of Fooocus/kohya. The module names are written out by hand below for
the tiny UNet's layout (layers_per_block 2, cross-attention in the last down / first up block),
so a test that compares `pipeline.lora` (which maps keys with diffusers' converters) against
these expectations checks the key mapping as well as the arithmetic.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.interfaces import INPAINT_HEAD_PARAM, TEXT_ENCODER_G, TEXT_ENCODER_L, UNET

# (kohya module name, leaf, leaf parameter name) for the tiny checkpoint. SDXL kohya files name UNet
# modules in the sgm layout (input_blocks / middle_block / output_blocks). transformers 5's
# CLIPTextModel has no `text_model.` level (CLIPTextModelWithProjection keeps it); LoRA files
# name both with it.
KOHYA_MODULES = (
    ("lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q", UNET,
     "model.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
    ("lora_unet_input_blocks_8_1_transformer_blocks_0_attn2_to_k", UNET,
     "model.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight"),
    ("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0", UNET,
     "model.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"),
    ("lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj", UNET,
     "model.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"),
    ("lora_unet_output_blocks_1_1_proj_in", UNET, "model.up_blocks.0.attentions.1.proj_in.weight"),
    ("lora_unet_input_blocks_1_0_in_layers_2", UNET, "model.down_blocks.0.resnets.0.conv1.weight"),  # 3x3 conv
    ("lora_unet_output_blocks_4_0_skip_connection", UNET, "model.up_blocks.1.resnets.1.conv_shortcut.weight"),
    ("lora_unet_time_embed_0", UNET, "model.time_embedding.linear_1.weight"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", TEXT_ENCODER_L,
     "model.encoder.layers.0.self_attn.q_proj.weight"),
    ("lora_te1_text_model_encoder_layers_1_mlp_fc1", TEXT_ENCODER_L, "model.encoder.layers.1.mlp.fc1.weight"),
    ("lora_te1_text_model_encoder_layers_2_self_attn_out_proj", TEXT_ENCODER_L,
     "model.encoder.layers.2.self_attn.out_proj.weight"),
    ("lora_te2_text_model_encoder_layers_0_self_attn_k_proj", TEXT_ENCODER_G,
     "model.text_model.encoder.layers.0.self_attn.k_proj.weight"),
    ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", TEXT_ENCODER_G,
     "model.text_model.encoder.layers.0.self_attn.out_proj.weight"),
    ("lora_te2_text_model_encoder_layers_1_mlp_fc2", TEXT_ENCODER_G, "model.text_model.encoder.layers.1.mlp.fc2.weight"),
    ("lora_te2_text_projection", TEXT_ENCODER_G, "model.text_projection.weight"),
)

# (diffusers/peft module key, leaf, leaf parameter name)
DIFFUSERS_MODULES = (
    ("unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_v", UNET,
     "model.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_v.weight"),
    ("unet.up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_q", UNET,
     "model.up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_q.weight"),
    ("unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2", UNET,
     "model.mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"),
    ("unet.up_blocks.2.resnets.0.conv2", UNET, "model.up_blocks.2.resnets.0.conv2.weight"),  # 3x3 conv
    ("text_encoder.text_model.encoder.layers.0.self_attn.v_proj", TEXT_ENCODER_L,
     "model.encoder.layers.0.self_attn.v_proj.weight"),
    ("text_encoder_2.text_model.encoder.layers.1.mlp.fc1", TEXT_ENCODER_G,
     "model.text_model.encoder.layers.1.mlp.fc1.weight"),
    ("text_encoder_2.text_model.encoder.layers.2.self_attn.k_proj", TEXT_ENCODER_G,
     "model.text_model.encoder.layers.2.self_attn.k_proj.weight"),
)

# (ldm key as the .fooocus.patch writes it, leaf parameter name); one without the prefix.
FOOOCUS_PATCH_KEYS = (
    ("diffusion_model.input_blocks.0.0.weight", "model.conv_in.weight"),
    ("diffusion_model.input_blocks.7.1.transformer_blocks.0.attn1.to_k.weight",
     "model.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_k.weight"),
    ("diffusion_model.input_blocks.4.0.in_layers.0.weight", "model.down_blocks.1.resnets.0.norm1.weight"),
    ("diffusion_model.middle_block.2.emb_layers.1.bias", "model.mid_block.resnets.1.time_emb_proj.bias"),
    ("diffusion_model.output_blocks.2.2.conv.weight", "model.up_blocks.0.upsamplers.0.conv.weight"),
    ("diffusion_model.out.2.weight", "model.conv_out.weight"),
    ("diffusion_model.label_emb.0.0.weight", "model.add_embedding.linear_1.weight"),
    ("time_embed.2.bias", "model.time_embedding.linear_2.bias"),
)

_COMPONENT_FILES = {UNET: "unet/diffusion_pytorch_model.safetensors", TEXT_ENCODER_L: "text_encoder/model.safetensors",
                    TEXT_ENCODER_G: "text_encoder_2/model.safetensors"}


def leaf_shapes(checkpoint_dir: str | Path) -> dict[str, dict[str, tuple]]:
    """{leaf: {leaf parameter name: shape}} of a diffusers folder, read from the safetensors headers."""
    from safetensors import safe_open

    shapes = {}
    for leaf, rel in _COMPONENT_FILES.items():
        with safe_open(str(Path(checkpoint_dir) / rel), framework="pt") as f:
            shapes[leaf] = {f"model.{k}": tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    # The leaf's inpaint head (pipeline.torch_leaves.ConvInWithInpaintHead): conv_in's outputs x (latent + 1).
    out_ch, in_ch = shapes[UNET]["model.conv_in.weight"][:2]
    shapes[UNET][INPAINT_HEAD_PARAM] = (out_ch, in_ch + 1, 3, 3)
    return shapes


def _pair(shape: tuple, rank: int, g: torch.Generator, scale: float):
    """(down, up) for a weight of `shape`: linear (out, in) or conv (out, in, k, k) with a kxk
    down and a 1x1 up, as kohya's LoCon writes them."""
    out = shape[0]
    down = torch.randn((rank, *shape[1:]), generator=g) * scale
    up = torch.randn((out, rank, *([1, 1] if len(shape) == 4 else [])), generator=g) * scale
    return down, up


def _delta(down, up, shape, alpha: float | None):
    rank = down.shape[0]
    scale = (alpha / rank) if alpha is not None else 1.0
    return scale * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(shape)


def save_kohya_lora(path: str | Path, checkpoint_dir: str | Path, seed: int = 0, rank: int = 4,
                    alpha: float = 2.0, scale: float = 0.2, dtype=torch.float16) -> dict:
    """A kohya-format LoRA (`lora_unet_*` in sgm naming, `lora_te1_*`, `lora_te2_*`, with .alpha)
    over attention and feed-forward linears, a 3x3 conv, a 1x1 conv, the time embedding and both
    text encoders. Stored in fp16 like most LoRA files; the returned deltas use the stored values."""
    from safetensors.torch import save_file

    shapes = leaf_shapes(checkpoint_dir)
    g = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for name, leaf, param in KOHYA_MODULES:
        shape = shapes[leaf][param]
        down, up = (t.to(dtype) for t in _pair(shape, rank, g, scale))
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
        expected.setdefault(leaf, {})[param] = _delta(down.float(), up.float(), shape, float(state[f"{name}.alpha"]))
    save_file(state, str(path))
    return expected


def save_diffusers_lora(path: str | Path, checkpoint_dir: str | Path, seed: int = 1, rank: int = 4,
                        scale: float = 0.2) -> dict:
    """A diffusers/peft-format LoRA (`unet.<module>.lora_A.weight`, `text_encoder.…`,
    `text_encoder_2.…`; no alphas: alpha = rank)."""
    from safetensors.torch import save_file

    shapes = leaf_shapes(checkpoint_dir)
    g = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for name, leaf, param in DIFFUSERS_MODULES:
        shape = shapes[leaf][param]
        down, up = _pair(shape, rank, g, scale)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down.contiguous(), up.contiguous()
        expected.setdefault(leaf, {})[param] = _delta(down, up, shape, None)
    save_file(state, str(path))
    return expected


def save_fooocus_patch(path: str | Path, checkpoint_dir: str | Path, seed: int = 2, span: float = 0.05) -> dict:
    """A Fooocus inpaint patch in its format: torch.save of {ldm UNet key: (uint8 q, min, max)},
    dW = q / 255 * (max - min) + min, over a conv, an attention linear, a norm, biases, the label
    embedding and conv_out (keys with and without the `diffusion_model.` prefix)."""
    shapes = leaf_shapes(checkpoint_dir)[UNET]
    g = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for key, param in FOOOCUS_PATCH_KEYS:
        shape = shapes[param]
        q = torch.randint(0, 256, shape, generator=g, dtype=torch.int64).to(torch.uint8)
        lo = torch.tensor(-span * float(torch.rand((), generator=g) + 0.5), dtype=torch.float16)
        hi = torch.tensor(span * float(torch.rand((), generator=g) + 0.5), dtype=torch.float16)
        state[key] = (q, lo, hi)
        expected[param] = q.float() / 255.0 * (hi.float() - lo.float()) + lo.float()
    torch.save(state, str(path))
    return {UNET: expected}


def save_inpaint_head(path: str | Path, checkpoint_dir: str | Path, seed: int = 3, scale: float = 0.1) -> dict:
    """Fooocus's `fooocus_inpaint_head.pth` layout: {"head": [conv_in channels, latent + 1, 3, 3]}."""
    shape = leaf_shapes(checkpoint_dir)[UNET][INPAINT_HEAD_PARAM]
    head = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    torch.save({"head": head}, str(path))
    return {UNET: {INPAINT_HEAD_PARAM: head}}
