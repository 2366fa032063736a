"""Wire models of Fooocus-API (v0.5.0.1), field by field. Defaults come from `pipeline.presets`.

Nothing here but the external API's shapes: no logic, no extra fields. Unknown request fields are
ignored (Fooocus-API's behaviour), `Lora.enabled` defaults to true (older clients omit it)."""
from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from pipeline import presets


class Request(BaseModel):
    # allow_inf_nan=False: Python's JSON parser accepts NaN/Infinity, which no field can use (and
    # which could not be written back out as JSON, e.g. in the persistent job history).
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)


# Fooocus-API's order (it shows in 422 messages: "Input should be 'Speed', 'Quality', ...").
_PERFORMANCE_ORDER = ("Speed", "Quality", "Extreme Speed", "Lightning", "Hyper-SD")
assert set(_PERFORMANCE_ORDER) == set(presets.PERFORMANCE_NAMES)
PerformanceSelection = Enum("PerformanceSelection", {n.replace(" ", "_").replace("-", "_"): n
                                                     for n in _PERFORMANCE_ORDER}, type=str)


class Lora(Request):
    enabled: bool = True
    model_name: str
    weight: float = Field(default=0.5, ge=-2, le=2)


class AdvancedParams(Request):
    disable_preview: bool = False
    disable_intermediate_results: bool = False
    disable_seed_increment: bool = False
    adm_scaler_positive: float = Field(1.5, ge=0.1, le=3.0)
    adm_scaler_negative: float = Field(0.8, ge=0.1, le=3.0)
    adm_scaler_end: float = Field(0.3, ge=0.0, le=1.0)
    adaptive_cfg: float = Field(presets.DEFAULT_ADAPTIVE_CFG, ge=1.0, le=30.0)
    clip_skip: int = Field(presets.DEFAULT_CLIP_SKIP, ge=1, le=12)
    sampler_name: str = presets.DEFAULT_SAMPLER
    scheduler_name: str = presets.DEFAULT_SCHEDULER
    overwrite_step: int = Field(-1, ge=-1, le=200)
    overwrite_switch: float = Field(-1, ge=-1, le=1)
    overwrite_width: int = Field(-1, ge=-1, le=2048)
    overwrite_height: int = Field(-1, ge=-1, le=2048)
    overwrite_vary_strength: float = Field(-1, ge=-1, le=1.0)
    overwrite_upscale_strength: float = Field(-1, ge=-1, le=1.0)
    mixing_image_prompt_and_vary_upscale: bool = False
    mixing_image_prompt_and_inpaint: bool = False
    debugging_cn_preprocessor: bool = False
    skipping_cn_preprocessor: bool = False
    canny_low_threshold: int = Field(64, ge=1, le=255)
    canny_high_threshold: int = Field(128, ge=1, le=255)
    refiner_swap_method: str = "joint"
    controlnet_softness: float = Field(0.25, ge=0.0, le=1.0)
    freeu_enabled: bool = False
    freeu_b1: float = 1.01
    freeu_b2: float = 1.02
    freeu_s1: float = 0.99
    freeu_s2: float = 0.95
    debugging_inpaint_preprocessor: bool = False
    inpaint_disable_initial_latent: bool = False
    inpaint_engine: str = "v2.6"
    inpaint_strength: float = Field(1.0, ge=0.0, le=1.0)
    inpaint_respective_field: float = Field(1.0, ge=0.0, le=1.0)
    inpaint_advanced_masking_checkbox: bool = True
    invert_mask_checkbox: bool = False
    inpaint_erode_or_dilate: int = Field(0, ge=-64, le=64)
    black_out_nsfw: bool = False
    vae_name: str = "Default (model)"
    debugging_dino: bool = False
    dino_erode_or_dilate: int = Field(0, ge=-64, le=64)
    debugging_enhance_masks_checkbox: bool = False


def default_loras() -> list[Lora]:
    return [Lora(enabled=True, model_name=name, weight=weight) for name, weight in presets.DEFAULT_LORAS]


class CommonRequest(Request):
    """The JSON body of /v1/generation/text-to-image; every v2 request extends it."""

    prompt: str = ""
    negative_prompt: str = ""
    # Plain (copied per instance) defaults rather than factories: the OpenAPI document shows them.
    style_selections: list[str] = Field(list(presets.STYLE_DEFAULTS))
    performance_selection: PerformanceSelection = PerformanceSelection(presets.DEFAULT_PERFORMANCE)
    aspect_ratios_selection: str = presets.DEFAULT_ASPECT_RATIO
    image_number: int = Field(1, ge=1, le=presets.MAX_IMAGE_NUMBER)
    image_seed: int = -1
    sharpness: float = Field(presets.DEFAULT_SHARPNESS, ge=0.0, le=30.0)
    guidance_scale: float = Field(presets.DEFAULT_GUIDANCE_SCALE, ge=1.0, le=30.0)
    base_model_name: str = presets.DEFAULT_BASE_MODEL
    refiner_model_name: str = "None"
    refiner_switch: float = Field(presets.DEFAULT_REFINER_SWITCH, ge=0.1, le=1.0)
    loras: list[Lora] = Field(default_loras())
    advanced_params: AdvancedParams = Field(AdvancedParams())
    save_meta: bool = True
    meta_scheme: str = "fooocus"
    save_extension: str = "png"
    save_name: str = ""
    read_wildcards_in_order: bool = False
    require_base64: bool = False
    async_process: bool = False
    webhook_url: str | None = ""


class TaskType(str, Enum):
    text_2_img = "Text to Image"
    img_uov = "Image Upscale or Variation"
    img_inpaint_outpaint = "Image Inpaint or Outpaint"
    img_prompt = "Image Prompt"
    img_enhance = "Image Enhancement"
    not_found = "Not Found"


class AsyncJobStage(str, Enum):
    waiting = "WAITING"
    running = "RUNNING"
    success = "SUCCESS"
    error = "ERROR"


class GenerationFinishReason(str, Enum):
    success = "SUCCESS"
    queue_is_full = "QUEUE_IS_FULL"
    user_cancel = "USER_CANCEL"
    error = "ERROR"


class GeneratedImageResult(BaseModel):
    base64: str | None = None
    url: str | None = None
    seed: str
    finish_reason: GenerationFinishReason


class AsyncJobResponse(BaseModel):
    job_id: str
    job_type: TaskType
    job_stage: AsyncJobStage
    job_progress: int
    job_status: str | None = None
    job_step_preview: str | None = None
    job_result: list[GeneratedImageResult] | None = None


class JobQueueInfo(BaseModel):
    running_size: int
    finished_size: int
    last_job_id: str | None = None


# --- image tasks -------------------------------------------------------------------------------

class UpscaleOrVaryMethod(str, Enum):
    disabled = "Disabled"
    subtle_variation = "Vary (Subtle)"
    strong_variation = "Vary (Strong)"
    upscale_15 = "Upscale (1.5x)"
    upscale_2 = "Upscale (2x)"
    upscale_fast = "Upscale (Fast 2x)"
    upscale_custom = "Upscale (Custom)"


class OutpaintExpansion(str, Enum):
    left = "Left"
    right = "Right"
    top = "Top"
    bottom = "Bottom"


class ControlNetType(str, Enum):
    cn_ip = "ImagePrompt"
    cn_ip_face = "FaceSwap"
    cn_canny = "PyraCanny"
    cn_cpds = "CPDS"


class DescribeImageType(str, Enum):
    photo = "Photo"
    anime = "Anime"


class ImagePromptJson(Request):
    cn_img: str | None = None
    cn_stop: float | None = Field(0, ge=0, le=1)
    cn_weight: float | None = Field(0, ge=0, le=2)
    cn_type: ControlNetType = ControlNetType.cn_ip


class Text2ImgRequestWithPrompt(CommonRequest):
    image_prompts: list[ImagePromptJson] = Field([])


class ImgUpscaleOrVaryRequestJson(CommonRequest):
    input_image: str
    uov_method: UpscaleOrVaryMethod = UpscaleOrVaryMethod.upscale_2
    upscale_value: float | None = Field(1.0, ge=1.0, le=5.0)
    image_prompts: list[ImagePromptJson] = Field([])


class ImgInpaintOrOutpaintRequestJson(CommonRequest):
    input_image: str = ""
    input_mask: str | None = ""
    inpaint_additional_prompt: str | None = ""
    outpaint_selections: list[OutpaintExpansion] = Field([])
    outpaint_distance_left: int | None = -1
    outpaint_distance_right: int | None = -1
    outpaint_distance_top: int | None = -1
    outpaint_distance_bottom: int | None = -1
    image_prompts: list[ImagePromptJson] = Field([])


class ImgPromptRequestJson(ImgInpaintOrOutpaintRequestJson):
    input_image: str | None = None
    image_prompts: list[ImagePromptJson]


class EnhanceCtrlNets(Request):
    enhance_enabled: bool = False
    enhance_mask_dino_prompt: str = "face"
    enhance_prompt: str = ""
    enhance_negative_prompt: str = ""
    enhance_mask_model: str = "sam"
    enhance_mask_cloth_category: str = "full"
    enhance_mask_sam_model: str = "vit_b"
    enhance_mask_text_threshold: float = Field(0.25, ge=0, le=1)
    enhance_mask_box_threshold: float = Field(0.3, ge=0, le=1)
    enhance_mask_sam_max_detections: int = Field(0, ge=0, le=10)
    enhance_inpaint_disable_initial_latent: bool = False
    enhance_inpaint_engine: str = "v2.6"
    enhance_inpaint_strength: float = Field(1, ge=0, le=1)
    enhance_inpaint_respective_field: float = Field(0.618, ge=0, le=1)
    enhance_inpaint_erode_or_dilate: float = Field(0, ge=-64, le=64)
    enhance_mask_invert: bool = False


class ImageEnhanceRequestJson(CommonRequest):
    enhance_input_image: str = ""
    enhance_checkbox: bool = True
    enhance_uov_method: UpscaleOrVaryMethod = UpscaleOrVaryMethod.strong_variation
    enhance_uov_processing_order: str = "Before First Enhancement"
    enhance_uov_prompt_type: str = "Original Prompts"
    save_final_enhanced_image_only: bool = True
    enhance_ctrlnets: list[EnhanceCtrlNets]


class GenerateMaskRequest(Request):
    image: str
    mask_model: str = "isnet-general-use"
    cloth_category: str = "full"
    dino_prompt_text: str = ""
    sam_model: str = "vit_b"
    box_threshold: float = Field(0.3, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    sam_max_detections: int = Field(0, ge=0, le=10)
    dino_erode_or_dilate: float = Field(0, ge=-64, le=64)
    dino_debug: bool = False


# --- responses ---------------------------------------------------------------------------------

class JobHistoryInfo(BaseModel):
    job_id: str
    in_queue_mills: int
    start_mills: int
    finish_mills: int
    is_finished: bool = False


class JobHistoryResponse(BaseModel):
    queue: list[JobHistoryInfo] = Field(default_factory=list)
    history: list[JobHistoryInfo] = Field(default_factory=list)


class AllModelsResponse(BaseModel):
    model_filenames: list[str]
    lora_filenames: list[str]


class StopResponse(BaseModel):
    msg: str


class DescribeImageResponse(BaseModel):
    describe: str


# --- v1 multipart forms (the same fields as form values; files are separate parts) ------------

class CommonRequestForm(CommonRequest):
    save_meta: bool = False  # v1 forms default to false, JSON to true


class ImgUpscaleOrVaryForm(CommonRequestForm):
    uov_method: UpscaleOrVaryMethod
    upscale_value: float | None = Field(None, ge=1.0, le=5.0)


class ImgInpaintOrOutpaintForm(CommonRequestForm):
    inpaint_additional_prompt: str | None = ""
    outpaint_selections: list[OutpaintExpansion] = Field([])
    outpaint_distance_left: int = 0
    outpaint_distance_right: int = 0
    outpaint_distance_top: int = 0
    outpaint_distance_bottom: int = 0


class ImgPromptForm(ImgInpaintOrOutpaintForm):
    cn_stop1: float | None = Field(None, ge=0, le=1)
    cn_weight1: float | None = Field(None, ge=0, le=2)
    cn_type1: ControlNetType = ControlNetType.cn_ip
    cn_stop2: float | None = Field(None, ge=0, le=1)
    cn_weight2: float | None = Field(None, ge=0, le=2)
    cn_type2: ControlNetType = ControlNetType.cn_ip
    cn_stop3: float | None = Field(None, ge=0, le=1)
    cn_weight3: float | None = Field(None, ge=0, le=2)
    cn_type3: ControlNetType = ControlNetType.cn_ip
    cn_stop4: float | None = Field(None, ge=0, le=1)
    cn_weight4: float | None = Field(None, ge=0, le=2)
    cn_type4: ControlNetType = ControlNetType.cn_ip


def _enhance_form_fields() -> dict:
    fields = {}
    for n in (1, 2, 3):
        for name, f in EnhanceCtrlNets.model_fields.items():
            default = "" if name == "enhance_mask_dino_prompt" else f.default
            fields[f"{name}_{n}"] = (f.annotation, Field(default, **{k: v for m in f.metadata
                                                                     for k, v in _bounds(m).items()}))
    return fields


def _bounds(meta) -> dict:
    return {k: getattr(meta, k) for k in ("ge", "le") if getattr(meta, k, None) is not None}


class _ImageEnhanceFormBase(CommonRequestForm):
    enhance_checkbox: bool = True
    enhance_uov_method: UpscaleOrVaryMethod = UpscaleOrVaryMethod.strong_variation
    enhance_uov_processing_order: str = "Before First Enhancement"
    enhance_uov_prompt_type: str = "Original Prompts"


from pydantic import create_model  # noqa: E402  (the flattened enhance_*_N fields are generated)

ImageEnhanceForm = create_model("ImageEnhanceForm", __base__=_ImageEnhanceFormBase, **_enhance_form_fields())
