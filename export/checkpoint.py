"""Load an SDXL checkpoint's components: a diffusers folder, or a single-file `.safetensors`
(A1111/ComfyUI/Fooocus layout) read with the SDXL configs shipped in `export/configs/` so that
nothing is fetched from a model hub."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs" / "sdxl_base"


@dataclass
class SDXLComponents:
    text_encoder: object  # transformers CLIPTextModel
    text_encoder_2: object  # transformers CLIPTextModelWithProjection
    unet: object  # diffusers UNet2DConditionModel
    vae: object  # diffusers AutoencoderKL
    name: str
    expansion: object = None  # transformers GPT2LMHeadModel (Fooocus V2), when the checkpoint has one
    expansion_dir: Path | None = None  # its folder (tokenizer files and positive.txt beside the weights)


EXPANSION_DIR = "prompt_expansion"


def load_expansion(path: str | Path):
    """A prompt-expansion GPT-2 from a transformers folder (config.json + weights), e.g. Fooocus's
    `models/prompt_expansion/fooocus_expansion` with `fooocus_expansion.bin` saved as
    `pytorch_model.bin`."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True).eval().float()


def load_checkpoint(path: str | Path, expansion: str | Path | None = None) -> SDXLComponents:
    """`expansion`: a folder with a prompt-expansion GPT-2; by default `<path>/prompt_expansion`
    when `path` is a diffusers folder that has one (its tokenizer and positive.txt: export.expansion).
    Without it there is no expansion leaf (and "Fooocus V2" requests get no expansion text)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    if path.is_dir():
        pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)
    elif path.suffix in (".safetensors", ".ckpt"):
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "sdxl_base"
            shutil.copytree(CONFIG_DIR, config)
            from .tokenizer import sdxl_tokenizers

            tok, tok2 = sdxl_tokenizers(Path(tmp) / "vocab")
            tok.save_pretrained(config / "tokenizer")
            tok2.save_pretrained(config / "tokenizer_2")
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    else:
        raise ValueError(f"{path}: expected a diffusers folder or a .safetensors/.ckpt file")
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.unet, pipe.vae):
        module.eval().float()
    if expansion is None and path.is_dir() and (path / EXPANSION_DIR / "config.json").exists():
        expansion = path / EXPANSION_DIR
    gpt2 = load_expansion(expansion) if expansion is not None else None
    return SDXLComponents(pipe.text_encoder, pipe.text_encoder_2, pipe.unet, pipe.vae, path.name, gpt2,
                          Path(expansion) if expansion is not None else None)


def model_dims(c: SDXLComponents):
    from pipeline.interfaces import ModelDims

    unet_levels = len(c.unet.config.block_out_channels)
    vae_factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
    extra = {"size_multiple": vae_factor * 2 ** (unet_levels - 1)}
    from .realesrgan import SCALE as UPSCALER_SCALE

    # The upscaler is checkpoint-independent (Real-ESRGAN x4plus, export/realesrgan.py): every export has it.
    extra["upscaler_scale"] = UPSCALER_SCALE
    if c.expansion is not None:  # Fooocus V2's GPT-2: the repository gets a prompt_expansion leaf
        extra["expansion_vocab"] = int(c.expansion.config.vocab_size)
        extra["expansion_positions"] = int(c.expansion.config.n_positions)
    return ModelDims(
        text_l_hidden=c.text_encoder.config.hidden_size,
        text_l_layers=c.text_encoder.config.num_hidden_layers,
        text_g_hidden=c.text_encoder_2.config.hidden_size,
        text_g_layers=c.text_encoder_2.config.num_hidden_layers,
        pooled_dim=c.text_encoder_2.config.projection_dim,
        latent_channels=c.unet.config.in_channels,
        vae_scale_factor=vae_factor,
        vae_scaling_factor=float(c.vae.config.scaling_factor),
        extra=extra,
    )
