"""Torch implementations of the leaf model interfaces (`pipeline.interfaces`): thin wrappers
around the diffusers/transformers modules with exactly the leaf's inputs and outputs. The exporter
traces them to ONNX; the `python-torch` target serves them directly (GPU, fp16)."""
from __future__ import annotations

import torch

from .interfaces import PROMPT_EXPANSION, TEXT_ENCODER_G, TEXT_ENCODER_L, UNET, VAE_DECODER, VAE_ENCODER


class TextEncoderL(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=1)


class TextEncoderG(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=1), out.text_embeds


class UNet(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.model(sample, timestep, encoder_hidden_states,
                          added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                          return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.mean


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class PromptExpansion(torch.nn.Module):
    """GPT-2 without KV cache: logits at every position of the full sequence."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


def torch_modules(c) -> dict[str, torch.nn.Module]:
    """Each leaf model as a torch module with exactly the leaf interface's inputs and outputs
    (`prompt_expansion` only when the checkpoint has an expansion model)."""
    modules = {
        TEXT_ENCODER_L: TextEncoderL(c.text_encoder).eval(),
        TEXT_ENCODER_G: TextEncoderG(c.text_encoder_2).eval(),
        UNET: UNet(c.unet).eval(),
        VAE_ENCODER: VaeEncoder(c.vae).eval(),
        VAE_DECODER: VaeDecoder(c.vae).eval(),
    }
    if getattr(c, "expansion", None) is not None:
        modules[PROMPT_EXPANSION] = PromptExpansion(c.expansion).eval()
    return modules


COMPONENT_OF = {TEXT_ENCODER_L: "text_encoder", TEXT_ENCODER_G: "text_encoder_2", UNET: "unet",
                VAE_ENCODER: "vae", VAE_DECODER: "vae", PROMPT_EXPANSION: "prompt_expansion"}


def load_leaf(name: str, checkpoint_dir: str) -> torch.nn.Module:
    """One leaf's module from a diffusers folder, loading only the component it needs."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sub = COMPONENT_OF[name]
    if name == PROMPT_EXPANSION:
        from pathlib import Path

        from transformers import GPT2LMHeadModel

        return PromptExpansion(GPT2LMHeadModel.from_pretrained(str(Path(checkpoint_dir) / sub))).eval()
    if sub == "unet":
        from diffusers import UNet2DConditionModel

        return UNet(UNet2DConditionModel.from_pretrained(checkpoint_dir, subfolder=sub)).eval()
    if sub == "vae":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(checkpoint_dir, subfolder=sub)
        return (VaeEncoder(vae) if name == VAE_ENCODER else VaeDecoder(vae)).eval()
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name == TEXT_ENCODER_L:
        return TextEncoderL(CLIPTextModel.from_pretrained(checkpoint_dir, subfolder=sub)).eval()
    return TextEncoderG(CLIPTextModelWithProjection.from_pretrained(checkpoint_dir, subfolder=sub)).eval()
