"""The one place that defines each Triton model's tensor interface.

Export (ONNX input/output names and dynamic axes), the model-repository writer (config.pbtxt)
and the pipeline's model calls (BLS or in-process ONNX Runtime) all read these specs, so a
name or dtype can only change here.

Shapes use ints for fixed sizes and strings for dynamic axes. The first axis of every leaf
tensor is "batch". Sizes that depend on the checkpoint (hidden widths, layer counts) come from
`ModelDims`, which the exporter reads off the loaded modules and stores in the repository.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

PIPELINE_MODEL = "fooocus_pipeline"
TEXT_ENCODER_L = "text_encoder_l"
TEXT_ENCODER_G = "text_encoder_g"
UNET = "unet"
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
PROMPT_EXPANSION = "prompt_expansion"  # optional: Fooocus V2's GPT-2 (only when the checkpoint has one)
UPSCALER = "upscaler"  # optional: the ESRGAN x4 upscaler (checkpoint-independent; every export has it)
# Every leaf the project knows. A repository holds those `leaf_specs(dims)` lists: the SDXL five
# always, `prompt_expansion` only when the exported checkpoint came with an expansion model,
# `upscaler` when the export recorded `upscaler_scale`.
LEAF_MODEL_NAMES = (TEXT_ENCODER_L, TEXT_ENCODER_G, UNET, VAE_ENCODER, VAE_DECODER, PROMPT_EXPANSION, UPSCALER)
OPTIONAL_LEAF_NAMES = (PROMPT_EXPANSION, UPSCALER)
# The largest batch (axis 0) one call of each leaf takes: its config's `max_batch_size` (Triton's
# dynamic batcher merges concurrent jobs' calls up to it), its TensorRT profile's max batch, and
# the size the pipeline splits larger calls into (pipeline.batching). A refiner UNet takes the
# UNet's. Sized for 4 concurrent jobs (the pipeline's default `max_concurrent_jobs`).
LEAF_MAX_BATCH = {
    TEXT_ENCODER_L: 32,  # 4 jobs x (positive, negative) x up to 4 chunks of 75 tokens
    TEXT_ENCODER_G: 32,
    UNET: 8,  # 4 jobs x a CFG pair
    VAE_ENCODER: 8,
    VAE_DECODER: 8,
    PROMPT_EXPANSION: 8,
    UPSCALER: 1,  # one 512-px tile per call (pipeline.upscale): 4x outputs are large, no batching
}


def leaf_max_batch(role: str) -> int:
    """LEAF_MAX_BATCH of a leaf role (`unet` for a refiner's UNet)."""
    return LEAF_MAX_BATCH[role]

INPAINT_HEAD_PARAM = "model.conv_in.inpaint_head"  # the UNet leaf's inpaint-head weight (see leaf_specs)
# The Triton request parameter (a JSON string) that carries a weight-patch set to the text encoders
# and the UNet (pipeline.lora: [[kind, path, weight], ...]); absent = the exported weights.
PATCHES_PARAMETER = "weight_patches"
TOKENS_PER_CHUNK = 77  # CLIP context: BOS + 75 tokens + EOS
ADD_TIME_IDS = 6  # SDXL micro-conditioning: orig (h, w), crop (top, left), target (h, w)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, int64, uint8, object (Triton BYTES)
    shape: tuple  # ints, or strings naming dynamic axes


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class ModelDims:
    """Checkpoint-dependent sizes. Real SDXL: 768/1280 hidden, 12/32 layers, 4 latent channels."""

    text_l_hidden: int
    text_l_layers: int
    text_g_hidden: int
    text_g_layers: int
    pooled_dim: int
    latent_channels: int = 4
    vae_scale_factor: int = 8  # pixels per latent cell
    vae_scaling_factor: float = 0.13025
    extra: dict = field(default_factory=dict)

    @property
    def expansion_vocab(self) -> int | None:
        """Vocabulary size of the prompt-expansion GPT-2, or None when the checkpoint has none
        (kept in `extra` so repositories written before it still load)."""
        vocab = self.extra.get("expansion_vocab")
        return int(vocab) if vocab else None

    @property
    def expansion_positions(self) -> int:
        """The expansion model's context length (GPT-2's n_positions)."""
        return int(self.extra.get("expansion_positions", 1024))

    @property
    def upscaler_scale(self) -> int | None:
        """Output size / input size of the `upscaler` leaf (4), or None when the repository has none."""
        scale = self.extra.get("upscaler_scale")
        return int(scale) if scale else None

    @property
    def context_dim(self) -> int:
        return self.text_l_hidden + self.text_g_hidden

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelDims":
        return cls(**data)


def leaf_specs(d: ModelDims) -> dict[str, ModelSpec]:
    """Tensor interfaces of the leaf models.

    Text encoders return every hidden state stacked on axis 1 (index 0 = embeddings,
    index -k = CLIP skip k), so one export serves any clip_skip. `text_embeds` is CLIP-G's
    projected pooled output. The UNet predicts epsilon; the VAE works on unscaled latents
    (the pipeline applies `vae_scaling_factor`) and images in [-1, 1]. `prompt_expansion` (only
    when `d.expansion_vocab` is set) is GPT-2 without KV cache: token ids in, next-token logits
    at every position out. The UNet carries Fooocus's inpaint head: a bias-free 3x3 conv
    (replicate padding) from `inpaint_latent` to conv_in's channels, added to conv_in's output;
    its weight is the initializer `INPAINT_HEAD_PARAM`, zero in every export and replaced per
    request when an inpaint engine is used. It also takes FreeU v2's factors `freeu` = (b1, b2,
    s1, s2) per sample (pipeline.freeu), applied in its output blocks; ones leave it unchanged.
    `upscaler` (only when `d.upscaler_scale` is set) maps RGB in [0, 1] to the image
    `upscaler_scale` times larger, not clamped (the caller clamps); its output is `upscaled`
    (ONNX cannot name an output like an input).
    """
    c = d.latent_channels
    ids = TensorSpec("input_ids", "int64", ("batch", TOKENS_PER_CHUNK))
    specs = {
        TEXT_ENCODER_L: ModelSpec(
            TEXT_ENCODER_L,
            (ids,),
            (TensorSpec("hidden_states", "float32",
                        ("batch", d.text_l_layers + 1, TOKENS_PER_CHUNK, d.text_l_hidden)),),
        ),
        TEXT_ENCODER_G: ModelSpec(
            TEXT_ENCODER_G,
            (ids,),
            (
                TensorSpec("hidden_states", "float32",
                           ("batch", d.text_g_layers + 1, TOKENS_PER_CHUNK, d.text_g_hidden)),
                TensorSpec("text_embeds", "float32", ("batch", d.pooled_dim)),
            ),
        ),
        UNET: ModelSpec(
            UNET,
            (
                TensorSpec("sample", "float32", ("batch", c, "latent_height", "latent_width")),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", d.context_dim)),
                TensorSpec("text_embeds", "float32", ("batch", d.pooled_dim)),
                TensorSpec("time_ids", "float32", ("batch", ADD_TIME_IDS)),
                # Fooocus's inpaint head input: concat(latent mask, scaled masked-image latent).
                # Zeros (or a zero head weight) leave the UNet unchanged.
                TensorSpec("inpaint_latent", "float32", ("batch", c + 1, "latent_height", "latent_width")),
                # FreeU v2's factors (b1, b2, s1, s2) per sample (pipeline.freeu); (1, 1, 1, 1) = off.
                TensorSpec("freeu", "float32", ("batch", 4)),
            ),
            (TensorSpec("noise_pred", "float32", ("batch", c, "latent_height", "latent_width")),),
        ),
        VAE_ENCODER: ModelSpec(
            VAE_ENCODER,
            (TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
            (TensorSpec("latent", "float32", ("batch", c, "latent_height", "latent_width")),),
        ),
        VAE_DECODER: ModelSpec(
            VAE_DECODER,
            (TensorSpec("latent", "float32", ("batch", c, "latent_height", "latent_width")),),
            (TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
        ),
    }
    if d.expansion_vocab:
        specs[PROMPT_EXPANSION] = ModelSpec(
            PROMPT_EXPANSION,
            (TensorSpec("input_ids", "int64", ("batch", "sequence")),),
            (TensorSpec("logits", "float32", ("batch", "sequence", d.expansion_vocab)),),
        )
    if d.upscaler_scale:
        specs[UPSCALER] = ModelSpec(
            UPSCALER,
            (TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
            (TensorSpec("upscaled", "float32", ("batch", 3, "out_height", "out_width")),),
        )
    return specs


# The decoupled pipeline model: one JSON task in, a stream of JSON events out. A result event
# carries the finished image as HxWx3 uint8; progress events may carry a small preview.
PIPELINE_SPEC = ModelSpec(
    PIPELINE_MODEL,
    (TensorSpec("task", "object", (1,)),),
    (
        TensorSpec("event", "object", (1,)),
        TensorSpec("image", "uint8", ("height", "width", 3)),
    ),
)
