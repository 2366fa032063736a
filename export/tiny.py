"""A tiny SDXL-shaped checkpoint with seeded random weights, built from the real architectures.

Same structure as SDXL where it matters to the pipeline: a diffusers UNet2DConditionModel with
SDXL's `text_time` conditioning (6 time ids + the pooled CLIP-G projection) cross-attending to the
concatenation of both text encoders' hidden states; an AutoencoderKL with 8x downsampling and
SDXL's scaling factor; CLIPTextModel and CLIPTextModelWithProjection with CLIP's vocabulary and
the real tokenizer. Sized so that the default request (30 steps at 1152*896, CFG) takes seconds
on 2 CPU cores: cross-attention only at 1/4 latent resolution, and no VAE mid-block attention
(which would be a 16k x 16k attention at 1152*896).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

TINY_SEED = 0
TEXT_HIDDEN = 32
POOLED_DIM = 32
TIME_EMBED_DIM = 8
EXPANSION_DIR = "prompt_expansion"  # beside the diffusers pipeline's folders


def build_tiny_expansion(seed: int = TINY_SEED):
    """Fooocus V2's prompt-expansion GPT-2, tiny and seeded, on CLIP's vocabulary (it reuses the
    CLIP tokenizer, so no GPT-2 vocabulary is needed offline)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed + 4)
    config = GPT2Config(vocab_size=49408, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=49406, eos_token_id=49407)
    return GPT2LMHeadModel(config).eval()


def build_tiny_sdxl(seed: int = TINY_SEED):
    """A diffusers StableDiffusionXLPipeline with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import sdxl_tokenizers

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 1), use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=1024, scaling_factor=0.13025,
        force_upcast=False, mid_block_add_attention=False,
    )
    text_config = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                       hidden_size=TEXT_HIDDEN, intermediate_size=37, num_attention_heads=4,
                       num_hidden_layers=3, max_position_embeddings=77, projection_dim=POOLED_DIM,
                       hidden_act="quick_gelu")
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_config, "hidden_act": "gelu"}))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1, prediction_type="epsilon", num_train_timesteps=1000)
    with tempfile.TemporaryDirectory() as tmp:
        tok, tok2 = sdxl_tokenizers(Path(tmp))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
        tokenizer_2=tok2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=False)


def save_tiny_sdxl(out_dir: Path, seed: int = TINY_SEED) -> Path:
    pipe = build_tiny_sdxl(seed)
    pipe.save_pretrained(out_dir)
    # diffusers' save_pretrained does not know the expansion model: a folder of its own.
    build_tiny_expansion(seed).save_pretrained(Path(out_dir) / EXPANSION_DIR)
    return out_dir
