"""Torch implementations of the leaf model interfaces (`pipeline.interfaces`): thin wrappers
around the diffusers/transformers modules with exactly the leaf's inputs and outputs. The exporter
traces them to ONNX; the `python-torch` target serves them directly (GPU, fp16)."""
from __future__ import annotations

import torch

from .freeu import install_freeu
from .interfaces import PROMPT_EXPANSION, TEXT_ENCODER_G, TEXT_ENCODER_L, UNET, UPSCALER, VAE_DECODER, VAE_ENCODER


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


class ConvInWithInpaintHead(torch.nn.Conv2d):
    """The UNet's conv_in plus Fooocus's inpaint head. Its input is the sample with the
    inpaint latent (mask + masked-image latent) appended on the channel axis; the head's output
    is added to conv_in's. The conv keeps its parameter names (`weight`, `bias`), so checkpoint
    keys, LoRA keys and ONNX initializer names stay those of the plain UNet; the head weight
    (`inpaint_head`) starts at zero, which leaves the UNet's output unchanged."""

    @classmethod
    def wrap(cls, conv: torch.nn.Conv2d, inpaint_channels: int) -> "ConvInWithInpaintHead":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight, new.bias = conv.weight, conv.bias
        new.inpaint_head = torch.nn.Parameter(torch.zeros(
            conv.out_channels, inpaint_channels, 3, 3, device=conv.weight.device, dtype=conv.weight.dtype))
        return new

    def forward(self, x):
        sample, inpaint = x[:, :self.in_channels], x[:, self.in_channels:]
        head = torch.nn.functional.conv2d(torch.nn.functional.pad(inpaint, (1, 1, 1, 1), mode="replicate"),
                                          self.inpaint_head)
        return super().forward(sample) + head


class UNet(torch.nn.Module):
    """The `unet` leaf: the diffusers UNet with Fooocus's inpaint head (`ConvInWithInpaintHead`)
    and FreeU v2 (`pipeline.freeu`: forward pre-hooks on the up blocks' resnets, fed the `freeu`
    factors of this call). Both leave every parameter name as it was."""

    def __init__(self, model):
        super().__init__()
        if not isinstance(model.conv_in, ConvInWithInpaintHead):
            model.conv_in = ConvInWithInpaintHead.wrap(model.conv_in, model.config.in_channels + 1)
        self.model = model
        self.freeu_state = install_freeu(model)  # not a module: no parameters, no state_dict entries

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, inpaint_latent, freeu):
        self.freeu_state.factors = freeu
        try:
            return self.model(torch.cat([sample, inpaint_latent.to(sample.dtype)], dim=1), timestep,
                              encoder_hidden_states,
                              added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                              return_dict=False)[0]
        finally:
            self.freeu_state.factors = None


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


class _DenseBlock(torch.nn.Module):
    """ESRGAN's residual dense block: five 3x3 convs, each seeing the block input and every
    earlier output; the last one's output, scaled by 0.2, is added to the input."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        for k in range(1, 6):
            out = num_grow_ch if k < 5 else num_feat
            setattr(self, f"conv{k}", torch.nn.Conv2d(num_feat + (k - 1) * num_grow_ch, out, 3, 1, 1))

    def forward(self, x):
        features = [x]
        for k in range(1, 5):
            features.append(torch.nn.functional.leaky_relu(
                getattr(self, f"conv{k}")(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class _RRDB(torch.nn.Module):
    """Residual in residual dense block: three dense blocks, the result scaled by 0.2 plus the input."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (_DenseBlock(num_feat, num_grow_ch) for _ in range(3))

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(torch.nn.Module):
    """The `upscaler` leaf: ESRGAN's RRDBNet x4 (Wang et al. 2018, "ESRGAN: Enhanced
    Super-Resolution Generative Adversarial Networks"), the network of Real-ESRGAN x4plus and of
    Fooocus's upscaler, with BasicSR's parameter names (conv_first, body.{i}.rdb{1,2,3}.conv{1..5},
    conv_body, conv_up1, conv_up2, conv_hr, conv_last). RGB in [0, 1] in, 4x the size out (not
    clamped: the caller clamps)."""

    scale = 4

    def __init__(self, num_feat: int = 64, num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        self.conv_first = torch.nn.Conv2d(3, num_feat, 3, 1, 1)
        self.body = torch.nn.Sequential(*(_RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body, self.conv_up1, self.conv_up2, self.conv_hr = (
            torch.nn.Conv2d(num_feat, num_feat, 3, 1, 1) for _ in range(4))
        self.conv_last = torch.nn.Conv2d(num_feat, 3, 3, 1, 1)

    def forward(self, image):
        f = torch.nn.functional
        feat = self.conv_first(image)
        feat = feat + self.conv_body(self.body(feat))
        feat = f.leaky_relu(self.conv_up1(f.interpolate(feat, scale_factor=2.0, mode="nearest")), 0.2)
        feat = f.leaky_relu(self.conv_up2(f.interpolate(feat, scale_factor=2.0, mode="nearest")), 0.2)
        return self.conv_last(f.leaky_relu(self.conv_hr(feat), 0.2))


UPSCALER_WEIGHTS = "upscaler.safetensors"  # the upscaler leaf's weights in a python-torch repository


def load_upscaler(path) -> RRDBNet:
    """The upscaler from converted weights (`export.realesrgan`): a safetensors file, or a folder
    holding `UPSCALER_WEIGHTS`. Every parameter must be there with its shape (strict load)."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    module = RRDBNet()
    module.load_state_dict(load_file(str(path / UPSCALER_WEIGHTS if path.is_dir() else path)), strict=True)
    return module.eval()


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
    """One leaf's module from a diffusers folder, loading only the component it needs. The
    checkpoint-independent `upscaler` takes its converted weights instead (`load_upscaler`: the
    repository writer points its `checkpoint` parameter at them)."""
    import os

    if name == UPSCALER:
        return load_upscaler(checkpoint_dir)
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
