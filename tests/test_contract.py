"""The Fooocus-API wire contract (docs: /work/shared/reference/fooocus_api_contract.md §1-5, §9),
route by route, over HTTP against the frontend under uvicorn and the session's Triton.

Checked: status codes, body shapes and key order where the contract fixes them, validation errors
(422 JSON everywhere, multipart routes included), the OpenAPI document's defaults against the
contract's tables, files, API key, upload limits, CORS, GZip, job history, stop, QUEUE_IS_FULL.
Generations are tiny (256*256, 2 steps; image tasks on 64 px inputs); image prompts and enhance
are accepted and end as ERROR naming the missing feature.
"""
from __future__ import annotations

import base64
import concurrent.futures
import gzip
import io
import json
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import served_frontend

from .conftest import FIXTURE_IMAGES  # noqa: E402

IMAGES = FIXTURE_IMAGES

SMALL = {"aspect_ratios_selection": "256*256", "advanced_params": {"overwrite_step": 2}}
SMALL_FORM = {"aspect_ratios_selection": "256*256", "advanced_params": json.dumps({"overwrite_step": 2})}
# Runs for minutes unless stopped: a job that keeps a queue slot or a worker busy.
LONG = {"prompt": "a long job", "aspect_ratios_selection": "512*512", "async_process": True,
        "advanced_params": {"overwrite_step": 150}}

RESULT_KEYS = ["base64", "url", "seed", "finish_reason"]
JOB_KEYS = ["job_id", "job_type", "job_stage", "job_progress", "job_status", "job_step_preview", "job_result"]
HISTORY_INFO_KEYS = ["job_id", "in_queue_mills", "start_mills", "finish_mills", "is_finished"]
TASK_INFO_KEYS = ["task_id", "task_type", "task_in_queue_mills", "task_start_mills", "task_finish_mills",
                  "result_url", "finish_reason", "date_time"]
NOT_FOUND_JOB = {"job_id": "", "job_type": "Not Found", "job_stage": "ERROR", "job_progress": 0,
                 "job_status": "Job not found", "job_step_preview": None, "job_result": None}
QUEUE_FULL_RESULT = {"base64": None, "url": None, "seed": "", "finish_reason": "QUEUE_IS_FULL"}

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def small_png(name: str, size: int = 64) -> bytes:
    """A fixture image shrunk to size x size (image tasks stay fast: their diffusion runs at shape
    ceil 1024 whatever the input, and the 4x upscaler's cost grows with the input's pixels)."""
    buf = io.BytesIO()
    Image.open(FIXTURE_IMAGES / name).convert("RGB").resize((size, size)).save(buf, "PNG")
    return buf.getvalue()


def image_bytes(name: str) -> bytes:
    return (IMAGES / name).read_bytes()


def b64(name: str) -> str:
    return base64.b64encode(image_bytes(name)).decode()


def is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def assert_validation_error(response: httpx.Response, loc: list | None = None, kind: str | None = None) -> list:
    """422 with {"detail": [{type, loc, msg, input, ...}]}; returns the items. When loc is given,
    one item's loc starts with it (and has type `kind` when given)."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    for item in detail:
        assert {"type", "loc", "msg", "input"} <= set(item), item
        assert list(item)[:4] == ["type", "loc", "msg", "input"], item
    if loc is not None:
        matches = [i for i in detail if i["loc"][:len(loc)] == loc]
        assert matches, detail
        if kind is not None:
            assert any(i["type"] == kind for i in matches), detail
    return detail


def assert_async_job(body: dict, job_type: str) -> str:
    assert list(body) == JOB_KEYS, body
    assert body["job_type"] == job_type
    assert body["job_stage"] == "WAITING" and body["job_progress"] == 0
    assert body["job_status"] is None and body["job_step_preview"] is None and body["job_result"] is None
    assert UUID4.fullmatch(body["job_id"]), body["job_id"]
    return body["job_id"]


def assert_unsupported(frontend, job_id: str) -> dict:
    """An accepted image job ends as ERROR whose status names the missing feature."""
    job = frontend.wait_job(job_id, timeout=60)
    assert list(job) == JOB_KEYS
    assert job["job_stage"] == "ERROR" and job["job_result"] is None, job
    assert "not supported" in job["job_status"], job
    return job


def generate(client: httpx.Client, path: str = "/v1/generation/text-to-image", **fields) -> list[dict]:
    r = client.post(path, json={"prompt": "a cat", **SMALL, **fields})
    assert r.status_code == 200, r.text
    results = r.json()
    assert isinstance(results, list) and results
    for result in results:
        assert list(result) == RESULT_KEYS, result
    return results


def fetch(frontend, url: str, accept: str = "*/*") -> httpx.Response:
    assert url.startswith(frontend.base_url + "/files/"), url
    return frontend.client.get(url[len(frontend.base_url):], headers={"accept": accept})


def wait_running(frontend, job_id: str, timeout: float = 60) -> dict:
    """Until the job samples (its status is 'Step i/N ...')."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = frontend.client.get("/v1/generation/query-job", params={"job_id": job_id}).json()
        assert job["job_stage"] in ("WAITING", "RUNNING"), job
        if job["job_stage"] == "RUNNING" and (job["job_status"] or "").startswith("Step"):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} never started sampling")


@pytest.fixture(scope="module")
def png_result(served) -> dict:
    """One finished text-to-image PNG (require_base64): its result and file bytes."""
    (result,) = generate(served.client, require_base64=True, image_seed=42, prompt="a red fox")
    r = fetch(served, result["url"])
    assert r.status_code == 200
    return {"result": result, "data": r.content}


# --- §1 basic routes, FastAPI defaults ----------------------------------------------------------

def test_ping_home_docs_and_openapi(served):
    c = served.client
    r = c.get("/ping")
    assert r.status_code == 200 and r.json() == "pong"
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text == 'Swagger-UI to: <a href="/docs">/docs</a>'
    for path in ("/docs", "/redoc"):
        r = c.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    r = c.get("/openapi.json")
    assert r.status_code == 200
    info = r.json()["info"]
    assert info["title"] == "FastAPI" and info["version"] == "0.1.0"


CONTRACT_ROUTES = [
    ("get", "/ping"), ("post", "/v1/generation/text-to-image"), ("post", "/v1/generation/image-upscale-vary"),
    ("post", "/v1/generation/image-inpaint-outpaint"), ("post", "/v1/generation/image-prompt"),
    ("post", "/v1/generation/image-enhance"), ("post", "/v2/generation/text-to-image-with-ip"),
    ("post", "/v2/generation/image-upscale-vary"), ("post", "/v2/generation/image-inpaint-outpaint"),
    ("post", "/v2/generation/image-prompt"), ("post", "/v2/generation/image-enhance"),
    ("get", "/v1/generation/query-job"), ("get", "/v1/generation/job-queue"),
    ("get", "/v1/generation/job-history"), ("post", "/v1/generation/stop"), ("post", "/v1/tools/describe-image"),
    ("post", "/v1/tools/generate_mask"), ("get", "/v1/engines/all-models"), ("post", "/v1/engines/refresh-models"),
    ("get", "/v1/engines/styles"), ("get", "/v1/engines/clean_vram"), ("get", "/files/{date}/{file_name}"),
]


def test_openapi_lists_every_contract_route(served):
    paths = served.client.get("/openapi.json").json()["paths"]
    for method, path in CONTRACT_ROUTES:
        assert method in paths.get(path, {}), (method, path)


@pytest.mark.parametrize("method,path", [("get", "/nope"), ("post", "/v1/generation/nope"),
                                         ("get", "/v3/generation/text-to-image"), ("get", "/files")])
def test_unknown_path_is_404_not_found(served, method, path):
    r = served.client.request(method, path)
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


@pytest.mark.parametrize("method,path", [("get", "/v1/generation/text-to-image"), ("put", "/ping"),
                                         ("post", "/v1/generation/query-job"), ("get", "/v1/generation/stop"),
                                         ("post", "/v1/engines/clean_vram"), ("delete", "/v1/engines/styles"),
                                         ("get", "/v2/generation/image-prompt"), ("get", "/v1/tools/generate_mask")])
def test_wrong_method_is_405(served, method, path):
    r = served.client.request(method, path)
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}


# --- §2 request models: the OpenAPI defaults against the contract's tables --------------------

DEFAULT_LORAS = [{"enabled": True, "model_name": "sd_xl_offset_example-lora_1.0.safetensors", "weight": 0.1}] + \
                [{"enabled": True, "model_name": "None", "weight": 1.0}] * 4

ADVANCED_DEFAULTS = {  # §2.2
    "disable_preview": False, "disable_intermediate_results": False, "disable_seed_increment": False,
    "adm_scaler_positive": 1.5, "adm_scaler_negative": 0.8, "adm_scaler_end": 0.3, "adaptive_cfg": 7.0,
    "clip_skip": 2, "sampler_name": "dpmpp_2m_sde_gpu", "scheduler_name": "karras", "overwrite_step": -1,
    "overwrite_switch": -1, "overwrite_width": -1, "overwrite_height": -1, "overwrite_vary_strength": -1,
    "overwrite_upscale_strength": -1, "mixing_image_prompt_and_vary_upscale": False,
    "mixing_image_prompt_and_inpaint": False, "debugging_cn_preprocessor": False,
    "skipping_cn_preprocessor": False, "canny_low_threshold": 64, "canny_high_threshold": 128,
    "refiner_swap_method": "joint", "controlnet_softness": 0.25, "freeu_enabled": False, "freeu_b1": 1.01,
    "freeu_b2": 1.02, "freeu_s1": 0.99, "freeu_s2": 0.95, "debugging_inpaint_preprocessor": False,
    "inpaint_disable_initial_latent": False, "inpaint_engine": "v2.6", "inpaint_strength": 1.0,
    "inpaint_respective_field": 1.0, "inpaint_advanced_masking_checkbox": True, "invert_mask_checkbox": False,
    "inpaint_erode_or_dilate": 0, "black_out_nsfw": False, "vae_name": "Default (model)", "debugging_dino": False,
    "dino_erode_or_dilate": 0, "debugging_enhance_masks_checkbox": False,
}
ADVANCED_RANGES = {
    "adm_scaler_positive": (0.1, 3.0), "adm_scaler_negative": (0.1, 3.0), "adm_scaler_end": (0, 1),
    "adaptive_cfg": (1, 30), "clip_skip": (1, 12), "overwrite_step": (-1, 200), "overwrite_switch": (-1, 1),
    "overwrite_width": (-1, 2048), "overwrite_height": (-1, 2048), "overwrite_vary_strength": (-1, 1),
    "overwrite_upscale_strength": (-1, 1), "canny_low_threshold": (1, 255), "canny_high_threshold": (1, 255),
    "controlnet_softness": (0, 1), "inpaint_strength": (0, 1), "inpaint_respective_field": (0, 1),
    "inpaint_erode_or_dilate": (-64, 64), "dino_erode_or_dilate": (-64, 64),
}
COMMON_DEFAULTS = {  # §2.1
    "prompt": "", "negative_prompt": "", "style_selections": ["Fooocus V2", "Fooocus Enhance", "Fooocus Sharp"],
    "performance_selection": "Speed", "aspect_ratios_selection": "1152*896", "image_number": 1, "image_seed": -1,
    "sharpness": 2.0, "guidance_scale": 4.0, "base_model_name": "juggernautXL_v8Rundiffusion.safetensors",
    "refiner_model_name": "None", "refiner_switch": 0.5, "loras": DEFAULT_LORAS,
    "advanced_params": ADVANCED_DEFAULTS, "save_meta": True, "meta_scheme": "fooocus", "save_extension": "png",
    "save_name": "", "read_wildcards_in_order": False, "require_base64": False, "async_process": False,
    "webhook_url": "",
}
COMMON_RANGES = {"image_number": (1, 32), "sharpness": (0, 30), "guidance_scale": (1, 30),
                 "refiner_switch": (0.1, 1.0)}
IMAGE_PROMPT_DEFAULTS = {"cn_img": None, "cn_stop": 0, "cn_weight": 0, "cn_type": "ImagePrompt"}  # §2.6
INPAINT_DEFAULTS = {  # §2.5 (v2)
    "input_image": "", "input_mask": "", "inpaint_additional_prompt": "", "outpaint_selections": [],
    "outpaint_distance_left": -1, "outpaint_distance_right": -1, "outpaint_distance_top": -1,
    "outpaint_distance_bottom": -1, "image_prompts": [],
}
V2_MODELS = {  # model -> (its own fields' defaults, required fields)
    "Text2ImgRequestWithPrompt": ({"image_prompts": []}, set()),
    "ImgUpscaleOrVaryRequestJson": ({"uov_method": "Upscale (2x)", "upscale_value": 1.0, "image_prompts": []},
                                    {"input_image"}),
    "ImgInpaintOrOutpaintRequestJson": (INPAINT_DEFAULTS, set()),
    "ImgPromptRequestJson": ({**{k: v for k, v in INPAINT_DEFAULTS.items() if k != "image_prompts"},
                              "input_image": None}, {"image_prompts"}),
    "ImageEnhanceRequestJson": ({"enhance_input_image": "", "enhance_checkbox": True,
                                 "enhance_uov_method": "Vary (Strong)",
                                 "enhance_uov_processing_order": "Before First Enhancement",
                                 "enhance_uov_prompt_type": "Original Prompts",
                                 "save_final_enhanced_image_only": True}, {"enhance_ctrlnets"}),
}
ENHANCE_CTRLNET_DEFAULTS = {  # §2.7
    "enhance_enabled": False, "enhance_mask_dino_prompt": "face", "enhance_prompt": "",
    "enhance_negative_prompt": "", "enhance_mask_model": "sam", "enhance_mask_cloth_category": "full",
    "enhance_mask_sam_model": "vit_b", "enhance_mask_text_threshold": 0.25, "enhance_mask_box_threshold": 0.3,
    "enhance_mask_sam_max_detections": 0, "enhance_inpaint_disable_initial_latent": False,
    "enhance_inpaint_engine": "v2.6", "enhance_inpaint_strength": 1, "enhance_inpaint_respective_field": 0.618,
    "enhance_inpaint_erode_or_dilate": 0, "enhance_mask_invert": False,
}
GENERATE_MASK_DEFAULTS = {  # §2.8
    "mask_model": "isnet-general-use", "cloth_category": "full", "dino_prompt_text": "", "sam_model": "vit_b",
    "box_threshold": 0.3, "text_threshold": 0.25, "sam_max_detections": 0, "dino_erode_or_dilate": 0,
    "dino_debug": False,
}
ENUMS = {  # §2.3
    "PerformanceSelection": ["Speed", "Quality", "Extreme Speed", "Lightning", "Hyper-SD"],
    "UpscaleOrVaryMethod": ["Disabled", "Vary (Subtle)", "Vary (Strong)", "Upscale (1.5x)", "Upscale (2x)",
                            "Upscale (Fast 2x)", "Upscale (Custom)"],
    "OutpaintExpansion": ["Left", "Right", "Top", "Bottom"],
    "ControlNetType": ["ImagePrompt", "FaceSwap", "PyraCanny", "CPDS"],
    "DescribeImageType": ["Photo", "Anime"],
    "TaskType": ["Text to Image", "Image Upscale or Variation", "Image Inpaint or Outpaint", "Image Prompt",
                 "Image Enhancement", "Not Found"],
    "AsyncJobStage": ["WAITING", "RUNNING", "SUCCESS", "ERROR"],
    "GenerationFinishReason": ["SUCCESS", "QUEUE_IS_FULL", "USER_CANCEL", "ERROR"],
}


@pytest.fixture(scope="module")
def openapi(served) -> dict:
    return served.client.get("/openapi.json").json()


def defaults_of(schema: dict) -> dict:
    """Each property's default. FastAPI writes the OpenAPI document without null values, so a
    default of null shows as no default: it reads back as None for fields that are not required."""
    required = set(schema.get("required", []))
    return {name: prop.get("default", "<no default>" if name in required or "anyOf" not in prop else None)
            for name, prop in schema["properties"].items()}


def bounds(prop: dict) -> tuple:
    for option in [prop, *prop.get("anyOf", [])]:
        if "minimum" in option or "maximum" in option:
            return option.get("minimum"), option.get("maximum")
    return None, None


def test_openapi_common_request_defaults_match_the_contract(openapi):
    schema = openapi["components"]["schemas"]["CommonRequest"]
    assert defaults_of(schema) == COMMON_DEFAULTS
    assert not schema.get("required")
    for name, (lo, hi) in COMMON_RANGES.items():
        assert bounds(schema["properties"][name]) == (lo, hi), name


def test_openapi_advanced_params_and_lora_match_the_contract(openapi):
    schemas = openapi["components"]["schemas"]
    adv = schemas["AdvancedParams"]
    assert defaults_of(adv) == ADVANCED_DEFAULTS
    assert not adv.get("required")
    for name, prop in adv["properties"].items():
        assert bounds(prop) == ADVANCED_RANGES.get(name, (None, None)), name
    lora = schemas["Lora"]
    assert defaults_of(lora) == {"enabled": True, "model_name": "<no default>", "weight": 0.5}
    assert lora["required"] == ["model_name"]
    assert bounds(lora["properties"]["weight"]) == (-2, 2)


@pytest.mark.parametrize("model", sorted(V2_MODELS))
def test_openapi_v2_models_match_the_contract(openapi, model):
    own, required = V2_MODELS[model]
    schema = openapi["components"]["schemas"][model]
    defaults = defaults_of(schema)
    assert {k: defaults[k] for k in COMMON_DEFAULTS} == COMMON_DEFAULTS  # every v2 model extends CommonRequest
    assert {k: v for k, v in defaults.items() if k not in COMMON_DEFAULTS and k not in required} == own
    assert set(schema.get("required", [])) == required
    if model == "ImgUpscaleOrVaryRequestJson":
        assert bounds(schema["properties"]["upscale_value"]) == (1, 5)


def test_openapi_nested_v2_models_and_generate_mask_match_the_contract(openapi):
    schemas = openapi["components"]["schemas"]
    ip = schemas["ImagePromptJson"]
    assert defaults_of(ip) == IMAGE_PROMPT_DEFAULTS
    assert bounds(ip["properties"]["cn_stop"]) == (0, 1) and bounds(ip["properties"]["cn_weight"]) == (0, 2)
    assert defaults_of(schemas["EnhanceCtrlNets"]) == ENHANCE_CTRLNET_DEFAULTS
    mask = schemas["GenerateMaskRequest"]
    assert {k: v for k, v in defaults_of(mask).items() if k != "image"} == GENERATE_MASK_DEFAULTS
    assert mask["required"] == ["image"]


def test_openapi_enums_and_response_models(openapi):
    schemas = openapi["components"]["schemas"]
    for name, values in ENUMS.items():
        assert schemas[name]["enum"] == values, name
    assert list(schemas["GeneratedImageResult"]["properties"]) == RESULT_KEYS
    assert list(schemas["AsyncJobResponse"]["properties"]) == JOB_KEYS
    assert list(schemas["JobQueueInfo"]["properties"]) == ["running_size", "finished_size", "last_job_id"]


def form_schema(openapi: dict, path: str) -> dict:
    return openapi["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]


@pytest.mark.parametrize("path,required", [
    ("/v1/generation/image-upscale-vary", {"input_image", "uov_method"}),
    ("/v1/generation/image-inpaint-outpaint", {"input_image"}),
    ("/v1/generation/image-prompt", set()),
    ("/v1/generation/image-enhance", {"enhance_input_image"}),
])
def test_openapi_v1_forms(openapi, path, required):
    schema = form_schema(openapi, path)
    props = schema["properties"]
    assert set(schema["required"]) == required
    assert props["save_meta"]["default"] is False  # v1 forms: false (JSON: true), §2.1
    assert props["sharpness"]["default"] == 2.0
    for name in ("loras", "advanced_params", "style_selections"):
        assert props[name]["type"] == "string"  # JSON-in-string / comma lists
    files = {n for n, p in props.items() if p.get("format") == "binary"}
    expected_files = {"/v1/generation/image-upscale-vary": {"input_image"},
                      "/v1/generation/image-inpaint-outpaint": {"input_image", "input_mask"},
                      "/v1/generation/image-prompt": {"input_image", "input_mask", "cn_img1", "cn_img2",
                                                      "cn_img3", "cn_img4"},
                      "/v1/generation/image-enhance": {"enhance_input_image"}}[path]
    assert files == expected_files
    if path == "/v1/generation/image-inpaint-outpaint":
        assert [props[f"outpaint_distance_{s}"]["default"] for s in ("left", "right", "top", "bottom")] == [0] * 4
    if path == "/v1/generation/image-prompt":
        assert all(props[f"cn_type{n}"]["default"] == "ImagePrompt" for n in range(1, 5))
    if path == "/v1/generation/image-enhance":
        assert props["enhance_mask_dino_prompt_1"]["default"] == ""  # "" here, "face" in JSON (§2.7)
        assert props["enhance_uov_method"]["default"] == "Vary (Strong)"


def test_openapi_query_parameters(openapi):
    def params(path, method="get"):
        return {p["name"]: p for p in openapi["paths"][path][method].get("parameters", [])}

    q = params("/v1/generation/query-job")
    assert q["job_id"]["required"] is True and q["require_step_preview"]["schema"]["default"] is False
    h = params("/v1/generation/job-history")
    assert {n: p["schema"].get("default") for n, p in h.items()} == {"job_id": None, "page": 0, "page_size": 20,
                                                                    "delete": False}
    d = params("/v1/tools/describe-image", "post")
    assert d["image_type"]["schema"]["default"] == "Photo" and "type" in d
    assert "accept" in params("/v1/generation/text-to-image", "post")


# --- v1 text-to-image (JSON) --------------------------------------------------------------------

def test_json_body_without_content_type_is_parsed(served):
    body = json.dumps({"prompt": "a cat", **SMALL, "async_process": True, "image_seed": 5})
    request = served.client.build_request("POST", "/v1/generation/text-to-image", content=body)
    assert "content-type" not in request.headers
    r = served.client.send(request)
    assert r.status_code == 200, r.text
    job_id = assert_async_job(r.json(), "Text to Image")
    job = served.wait_job(job_id)
    assert job["job_stage"] == "SUCCESS" and job["job_progress"] == 100 and job["job_status"] == "Finished"
    (result,) = job["job_result"]
    assert list(result) == RESULT_KEYS and result["seed"] == "5" and result["finish_reason"] == "SUCCESS"


def test_unknown_fields_ignored_and_lora_without_enabled(served):
    (result,) = generate(served.client, api_name="txt2img", unknown={"a": [1]}, image_seed=9,
                         loras=[{"model_name": "None", "weight": 0.5}, {"model_name": "x.safetensors"}])
    assert result["finish_reason"] == "SUCCESS" and result["seed"] == "9" and result["base64"] is None
    assert re.fullmatch(re.escape(served.base_url) + r"/files/\d{4}-\d{2}-\d{2}/[0-9a-f-]{36}-0\.png",
                        result["url"])


def test_invalid_values_answer_422_with_pydantic_items(served):
    r = served.client.post("/v1/generation/text-to-image", json={
        "image_number": 100, "performance_selection": "Fast", "loras": [{"weight": 1}]})
    detail = assert_validation_error(r, ["body", "performance_selection"], "enum")
    enum = next(i for i in detail if i["loc"] == ["body", "performance_selection"])
    assert enum["input"] == "Fast" and enum["msg"].startswith("Input should be 'Speed', 'Quality'")
    le = next(i for i in detail if i["loc"] == ["body", "image_number"])
    assert le["type"] == "less_than_equal" and le["ctx"] == {"le": 32} and le["input"] == 100
    assert any(i["loc"] == ["body", "loras", 0, "model_name"] and i["type"] == "missing" for i in detail)
    assert "url" not in enum


@pytest.mark.parametrize("body,loc,kind", [
    ({"image_number": 0}, ["body", "image_number"], "greater_than_equal"),
    ({"guidance_scale": 31}, ["body", "guidance_scale"], "less_than_equal"),
    ({"advanced_params": {"overwrite_step": 201}}, ["body", "advanced_params", "overwrite_step"], "less_than_equal"),
    ({"loras": [{"model_name": "a", "weight": 3}]}, ["body", "loras", 0, "weight"], "less_than_equal"),
    ({"style_selections": "Fooocus V2"}, ["body", "style_selections"], "list_type"),
    ({"image_seed": "abc"}, ["body", "image_seed"], "int_parsing"),
    ([1, 2], ["body"], None),
])
def test_out_of_range_and_wrong_types_are_422(served, body, loc, kind):
    assert_validation_error(served.client.post("/v1/generation/text-to-image", json=body), loc, kind)


def test_invalid_json_empty_body_and_nan_are_422(served):
    c = served.client
    detail = assert_validation_error(c.post("/v1/generation/text-to-image", content=b'{"prompt": '), ["body"])
    assert detail[0]["type"] == "json_invalid"
    detail = assert_validation_error(c.post("/v1/generation/text-to-image", content=b""), ["body"])
    assert detail == [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}]
    # Python's JSON parser takes NaN/Infinity: refused, and the 422 body itself stays valid JSON.
    for raw, field in ((b'{"sharpness": NaN}', "sharpness"), (b'{"image_seed": Infinity}', "image_seed"),
                       (b'{"advanced_params": {"freeu_b1": NaN}}', "advanced_params")):
        assert_validation_error(c.post("/v1/generation/text-to-image", content=raw), ["body", field])
    # JSON announced as text/plain: a 422 (Fooocus-API: 500), never a generation.
    r = c.post("/v1/generation/text-to-image", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert_validation_error(r, ["body"])


@pytest.mark.parametrize("how", ["query", "header"])
def test_accept_image_png_streams_png_bytes(served, how):
    kwargs = {"params": {"accept": "image/png"}} if how == "query" else {"headers": {"accept": "image/png"}}
    r = served.client.post("/v1/generation/text-to-image", json={"prompt": "a cat", **SMALL, "image_number": 2},
                           **kwargs)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content[:8] == PNG_MAGIC
    assert Image.open(io.BytesIO(r.content)).size == (256, 256)


def test_accept_query_overrides_the_header(served):
    r = served.client.post("/v1/generation/text-to-image", json={"prompt": "a cat", **SMALL},
                           params={"accept": "application/json"}, headers={"accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()[0]["finish_reason"] == "SUCCESS"


def test_require_base64_gives_a_png_data_uri(served, png_result):
    result = png_result["result"]
    assert result["finish_reason"] == "SUCCESS" and result["seed"] == "42"
    assert result["base64"].startswith("data:image/png;base64,")
    assert base64.b64decode(result["base64"].split(",", 1)[1]) == png_result["data"]


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "webp"])
def test_save_extension_writes_that_format(served, ext):
    (result,) = generate(served.client, save_extension=ext, require_base64=True)
    assert result["url"].endswith(f"-0.{ext}")
    r = fetch(served, result["url"])
    assert r.status_code == 200
    if ext == "webp":
        assert is_webp(r.content) and r.headers["content-type"] == "image/webp"
        assert result["base64"].startswith("data:image/webp;base64,")
    else:
        assert r.content[:3] == JPEG_MAGIC and r.headers["content-type"] == "image/jpeg"
        assert result["base64"].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(result["base64"].split(",", 1)[1]) == r.content


@pytest.mark.parametrize("scheme", ["fooocus", "a1111"])
def test_save_meta_embeds_parameters_in_the_png(served, scheme):
    (result,) = generate(served.client, prompt="a meta cat", negative_prompt="dog", image_seed=77,
                         save_meta=True, meta_scheme=scheme, style_selections=["Fooocus Sharp"])
    image = Image.open(io.BytesIO(fetch(served, result["url"]).content))
    text = image.info["parameters"]
    assert image.info["fooocus_scheme"] == scheme
    if scheme == "fooocus":
        data = json.loads(text)
        assert data["prompt"] == "a meta cat" and data["negative_prompt"] == "dog"
        assert data["seed"] == "77" and data["resolution"] == "(256, 256)" and data["steps"] == 2
        assert data["metadata_scheme"] == "fooocus" and data["styles"] == "['Fooocus Sharp']"
        # the style's template wraps the prompt in the full prompt Fooocus records
        assert data["full_prompt"][0] != "a meta cat" and "a meta cat" in data["full_prompt"][0]
    else:
        assert "a meta cat" in text.split("\n")[0]
        negative_line = next(line for line in text.split("\n") if line.startswith("Negative prompt: "))
        assert "dog" in negative_line
        assert "Steps: 2" in text and "Seed: 77" in text and "Size: 256x256" in text


def test_save_meta_false_embeds_nothing(served):
    (result,) = generate(served.client, save_meta=False)
    assert "parameters" not in Image.open(io.BytesIO(fetch(served, result["url"]).content)).info


def test_save_name_names_the_file(served):
    name = f"contract-{uuid.uuid4().hex[:8]}"
    (result,) = generate(served.client, save_name=name)
    assert re.fullmatch(re.escape(served.base_url) + rf"/files/\d{{4}}-\d{{2}}-\d{{2}}/{name}-0\.png", result["url"])
    assert fetch(served, result["url"]).content[:8] == PNG_MAGIC


def test_unsafe_save_name_stays_in_the_output_folder(served):
    root = Path(served.output_dir).resolve()
    # where "../../x" would land from the output folder or from its date folders
    outside = [root.parent / "x-0.png", root.parent.parent / "x-0.png", Path.cwd() / "x-0.png"]
    before = [p.exists() for p in outside]
    (result,) = generate(served.client, save_name="../../x")
    date, name = result["url"].split("/files/", 1)[1].split("/")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date) and name == "x-0.png"
    path = (root / date / name).resolve()
    assert path.is_file() and path.parent.parent == root
    assert [p.exists() for p in outside] == before


# --- v1 multipart routes ------------------------------------------------------------------------

def upload(name: str, field: str = "input_image", small: bool = False) -> tuple:
    # (filename, bytes): like the examples, no part content type
    return (field, small_png(name) if small else image_bytes(name))


@pytest.mark.parametrize("value", ["True", "true", "1", "yes", "on"])
def test_form_booleans_true(served, value):
    r = served.client.post("/v1/generation/image-upscale-vary", data={"uov_method": "Upscale (Fast 2x)",
                                                                        "async_process": value},
                           files={"input_image": upload("bear.jpg", small=True)})
    assert r.status_code == 200, r.text
    job = served.wait_job(assert_async_job(r.json(), "Image Upscale or Variation"))
    assert job["job_stage"] == "SUCCESS", job


@pytest.mark.parametrize("value", ["False", "false", "0"])
def test_form_booleans_false_is_sync(served, value):
    r = served.client.post("/v1/generation/image-upscale-vary",
                           data={"uov_method": "Vary (Strong)", "async_process": value, "image_seed": "12",
                                 "advanced_params": json.dumps({"overwrite_step": 2})},
                           files={"input_image": upload("bear.jpg", small=True)})
    assert r.status_code == 200, r.text
    (result,) = r.json()
    assert result["seed"] == "12" and result["finish_reason"] == "SUCCESS", result


def test_form_comma_lists_and_json_strings_are_accepted(served):
    data = {"uov_method": "Upscale (Custom)", "upscale_value": "1.5", "async_process": "true",
            "style_selections": "Fooocus V2, Fooocus Sharp", "performance_selection": "Quality",
            "loras": json.dumps([{"model_name": "None", "weight": 0.3}]),
            "advanced_params": json.dumps({"overwrite_step": 2, "sampler_name": "euler"}),
            "save_meta": "True", "prompt": "a bear", "api_name": "ignored", "unknown_field": "x"}
    r = served.client.post("/v1/generation/image-upscale-vary", data=data,
                           files={"input_image": upload("bear.jpg", small=True)})
    assert r.status_code == 200, r.text
    job = served.wait_job(assert_async_job(r.json(), "Image Upscale or Variation"))
    assert job["job_stage"] == "SUCCESS", job


@pytest.mark.parametrize("field,value,loc", [
    ("advanced_params", "{not json", ["body", "advanced_params"]),
    ("advanced_params", "[1, 2]", ["body", "advanced_params"]),
    ("advanced_params", json.dumps({"overwrite_step": 500}), ["body", "advanced_params", "overwrite_step"]),
    ("loras", "not json", ["body", "loras"]),
    ("loras", json.dumps({"model_name": "x"}), ["body", "loras"]),
    ("loras", json.dumps([{"weight": 1}]), ["body", "loras", 0, "model_name"]),
    ("uov_method", "Vary", ["body", "uov_method"]),
    ("async_process", "maybe", ["body", "async_process"]),
    ("image_number", "33", ["body", "image_number"]),
    ("sharpness", "nan", ["body", "sharpness"]),
])
def test_form_invalid_values_are_422_naming_the_field(served, field, value, loc):
    data = {"uov_method": "Upscale (2x)", field: value}
    r = served.client.post("/v1/generation/image-upscale-vary", data=data, files={"input_image": upload("bear.jpg")})
    assert_validation_error(r, loc)


@pytest.mark.parametrize("path,data,field", [
    ("/v1/generation/image-upscale-vary", {"uov_method": "Upscale (2x)"}, "input_image"),
    ("/v1/generation/image-inpaint-outpaint", {"prompt": "a cat"}, "input_image"),
    ("/v1/generation/image-enhance", {"enhance_enabled_1": "True"}, "enhance_input_image"),
])
def test_form_missing_required_file_is_422(served, path, data, field):
    assert_validation_error(served.client.post(path, data=data), ["body", field], "missing")
    # also when the multipart body holds only other files
    r = served.client.post(path, data=data, files={"other": upload("bear.jpg", "other")})
    assert_validation_error(r, ["body", field], "missing")


def test_form_routes_refuse_json_and_bad_images_with_422(served):
    c = served.client
    assert_validation_error(c.post("/v1/generation/image-upscale-vary", json={"uov_method": "Upscale (2x)"}),
                            ["body"])
    r = c.post("/v1/generation/image-upscale-vary", data={"uov_method": "Upscale (2x)"},
               files={"input_image": ("x.png", b"not an image")})
    assert_validation_error(r, ["body", "input_image"])


def test_inpaint_outpaint_sync_result(served):
    r = served.client.post("/v1/generation/image-inpaint-outpaint",
                           data={"prompt": "a cat", "outpaint_selections": "Left,Top", "image_seed": "3",
                                 "advanced_params": json.dumps({"overwrite_step": 2})},
                           files={"input_image": upload("inpaint_source.jpg", small=True),
                                  "input_mask": upload("inpaint_mask.png", "input_mask", small=True)})
    assert r.status_code == 200, r.text
    (result,) = r.json()
    assert list(result) == RESULT_KEYS
    assert result["seed"] == "3" and result["finish_reason"] == "SUCCESS", result
    # 64 px, Top then Left by int(0.3 * side): 64 + 19 on each axis
    assert Image.open(io.BytesIO(fetch(served, result["url"]).content)).size == (83, 83)


def test_inpaint_outpaint_without_mask_and_repeated_selection_fields(served):
    r = served.client.post("/v1/generation/image-inpaint-outpaint",
                           data={"outpaint_selections": ["Left", "Right"], "async_process": "True",
                                 "outpaint_distance_left": "16", "advanced_params": json.dumps({"overwrite_step": 2})},
                           files={"input_image": upload("bear.jpg", small=True)})
    assert r.status_code == 200, r.text
    job = served.wait_job(assert_async_job(r.json(), "Image Inpaint or Outpaint"))
    assert job["job_stage"] == "SUCCESS", job
    image = Image.open(io.BytesIO(fetch(served, job["job_result"][0]["url"]).content))
    assert image.size == (64 + 16 + 19, 64)  # left 16 px as asked, right int(0.3 * 64)
    r = served.client.post("/v1/generation/image-inpaint-outpaint", data={"outpaint_selections": "Left,Up"},
                           files={"input_image": upload("bear.jpg")})
    assert_validation_error(r, ["body", "outpaint_selections", 1], "enum")


def test_image_prompt_optional_files_and_ignored_image_prompts_field(served):
    r = served.client.post("/v1/generation/image-prompt",
                           data={"prompt": "a cat", "async_process": "True", "cn_type1": "ImagePrompt",
                                 "cn_stop1": "0.5", "cn_weight1": "0.6",
                                 "image_prompts": ["{'cn_img': None, 'cn_stop': 0.5}", "{'cn_type': 'FaceSwap'}"]},
                           files={"cn_img1": upload("image_prompt-0.jpg", "cn_img1")})
    assert r.status_code == 200, r.text
    job = assert_unsupported(served, assert_async_job(r.json(), "Image Prompt"))
    assert "Image prompt" in job["job_status"]
    assert_validation_error(served.client.post("/v1/generation/image-prompt", data={"cn_type2": "Canny"}),
                            ["body", "cn_type2"], "enum")


def test_image_prompt_without_any_image_is_text_to_image(served):
    r = served.client.post("/v1/generation/image-prompt", data={"prompt": "a cat", **SMALL_FORM,
                                                                 "image_prompts": "[]"})
    assert r.status_code == 200, r.text
    (result,) = r.json()
    assert result["finish_reason"] == "SUCCESS" and fetch(served, result["url"]).content[:8] == PNG_MAGIC


def test_image_enhance_form(served):
    r = served.client.post("/v1/generation/image-enhance",
                           data={"enhance_checkbox": "True", "enhance_uov_method": "Disabled",
                                 "enhance_enabled_1": "True", "enhance_mask_dino_prompt_1": "face",
                                 "enhance_enabled_2": "true", "enhance_mask_dino_prompt_2": "eyes",
                                 "async_process": "true"},
                           files={"enhance_input_image": upload("bear.jpg", "enhance_input_image")})
    assert r.status_code == 200, r.text
    assert_unsupported(served, assert_async_job(r.json(), "Image Enhancement"))
    r = served.client.post("/v1/generation/image-enhance", data={"enhance_mask_text_threshold_1": "2"},
                           files={"enhance_input_image": upload("bear.jpg", "enhance_input_image")})
    assert_validation_error(r, ["body", "enhance_mask_text_threshold_1"], "less_than_equal")


# --- v2 routes (JSON, images as strings) ----------------------------------------------------------

@pytest.mark.parametrize("encoding", ["raw", "data-uri", "urlsafe-unpadded"])
def test_v2_upscale_vary_takes_base64_and_data_uris(served, encoding):
    raw = b64("image_prompt-0.jpg")
    value = {"raw": raw, "data-uri": "data:image/jpeg;base64," + raw,
             "urlsafe-unpadded": raw.replace("+", "-").replace("/", "_").rstrip("=")}[encoding]
    r = served.client.post("/v2/generation/image-upscale-vary", json={
        "input_image": value, "uov_method": "Vary (Strong)", "performance_selection": "Speed",
        "advanced_params": {"overwrite_step": 2}, "async_process": True, "unknown": 1})
    assert r.status_code == 200, r.text
    job = served.wait_job(assert_async_job(r.json(), "Image Upscale or Variation"))
    assert job["job_stage"] == "SUCCESS", job
    # vary: 564 px has shape ceil 576, so it is resized to shape ceil 1024
    assert Image.open(io.BytesIO(fetch(served, job["job_result"][0]["url"]).content)).size == (1024, 1024)


@pytest.mark.parametrize("path,body,loc", [
    ("/v2/generation/image-upscale-vary", {"input_image": "http://127.0.0.1:1/x.png"}, ["body", "input_image"]),
    ("/v2/generation/image-inpaint-outpaint", {"input_image": b64("bear.jpg"),
                                               "input_mask": "http://localhost/mask.png"}, ["body", "input_mask"]),
    ("/v2/generation/text-to-image-with-ip", {"image_prompts": [{"cn_img": "http://127.0.0.1/x.png"}]},
     ["body", "image_prompts", 0, "cn_img"]),
    ("/v2/generation/image-prompt", {"image_prompts": [{"cn_img": "http://[::1]:8888/x.png"}]},
     ["body", "image_prompts", 0, "cn_img"]),
    ("/v2/generation/image-enhance", {"enhance_input_image": "http://10.0.0.1/x.png", "enhance_ctrlnets": []},
     ["body", "enhance_input_image"]),
    ("/v1/tools/generate_mask", {"image": "http://169.254.169.254/latest/meta-data"}, ["body", "image"]),
])
def test_v2_private_urls_are_refused_naming_the_field(served, path, body, loc):
    detail = assert_validation_error(served.client.post(path, json=body), loc)
    assert any("URL refused" in i["msg"] for i in detail), detail


@pytest.mark.parametrize("path,body,loc", [
    ("/v2/generation/image-upscale-vary", {"input_image": "!!not base64!!"}, ["body", "input_image"]),
    ("/v2/generation/image-upscale-vary", {"input_image": base64.b64encode(b"hello").decode()},
     ["body", "input_image"]),
    ("/v2/generation/image-upscale-vary", {}, ["body", "input_image"]),
    ("/v2/generation/image-upscale-vary", {"input_image": "", "uov_method": "Vary"}, ["body", "uov_method"]),
    ("/v2/generation/image-inpaint-outpaint", {"outpaint_selections": ["Up"]}, ["body", "outpaint_selections", 0]),
    ("/v2/generation/image-prompt", {"prompt": "a cat"}, ["body", "image_prompts"]),
    ("/v2/generation/image-prompt", {"image_prompts": [{"cn_type": "Canny"}]}, ["body", "image_prompts", 0]),
    ("/v2/generation/text-to-image-with-ip", {"image_prompts": [{"cn_weight": 3}]},
     ["body", "image_prompts", 0, "cn_weight"]),
    ("/v2/generation/image-enhance", {"enhance_input_image": b64("bear.jpg")}, ["body", "enhance_ctrlnets"]),
    ("/v2/generation/image-enhance", {"enhance_ctrlnets": []}, ["body", "enhance_input_image"]),
    ("/v2/generation/image-enhance", {"enhance_input_image": "string", "enhance_ctrlnets": []},
     ["body", "enhance_input_image"]),
])
def test_v2_invalid_inputs_are_422(served, path, body, loc):
    assert_validation_error(served.client.post(path, json=body), loc)


@pytest.mark.parametrize("path,body,job_type", [
    ("/v2/generation/image-upscale-vary", {"input_image": "string"}, "Image Upscale or Variation"),
    ("/v2/generation/image-inpaint-outpaint", {"input_image": "", "input_mask": "string"},
     "Image Inpaint or Outpaint"),
    ("/v2/generation/image-prompt", {"image_prompts": [], "input_image": None, "input_mask": None}, "Image Prompt"),
])
def test_v2_placeholder_images_mean_no_image(served, path, body, job_type):
    """"string" (Swagger's placeholder), "" and null are "no image": a plain text-to-image runs."""
    r = served.client.post(path, json={"prompt": "a cat", **SMALL, **body, "async_process": True})
    assert r.status_code == 200, r.text
    job = served.wait_job(assert_async_job(r.json(), job_type))
    assert job["job_stage"] == "SUCCESS" and job["job_type"] == job_type, job


def test_v2_text_to_image_with_empty_image_prompts_generates(served):
    prompts = [{"cn_img": "", "cn_stop": 0.6, "cn_weight": 0.8, "cn_type": "ImagePrompt"},
               {"cn_img": "string"}, {"cn_img": None}, {}]
    r = served.client.post("/v2/generation/text-to-image-with-ip", json={
        "prompt": "a cat", **SMALL, "image_prompts": prompts, "outpaint_selections": ["Left", "Right"]})
    assert r.status_code == 200, r.text
    (result,) = r.json()
    assert list(result) == RESULT_KEYS and result["finish_reason"] == "SUCCESS"
    assert fetch(served, result["url"]).content[:8] == PNG_MAGIC


@pytest.mark.parametrize("path,body,job_type,feature", [
    ("/v2/generation/image-prompt",
     {"image_prompts": [{"cn_img": b64("image_prompt-0.jpg"), "cn_stop": 0.5, "cn_weight": 0.6,
                         "cn_type": "ImagePrompt"}, {"cn_img": b64("bear.jpg"), "cn_type": "FaceSwap"}]},
     "Image Prompt", "Image prompt"),
    ("/v2/generation/text-to-image-with-ip",
     {"image_prompts": [{"cn_img": "data:image/jpeg;base64," + b64("bear.jpg")}]}, "Text to Image", "Image prompt"),
    ("/v2/generation/image-enhance",
     {"enhance_input_image": b64("bear.jpg"), "enhance_uov_method": "Vary (Strong)",
      "enhance_ctrlnets": [{"enhance_enabled": True, "enhance_mask_dino_prompt": "face"}]},
     "Image Enhancement", "Image enhancement"),
])
def test_v2_image_tasks_end_as_error_naming_the_feature(served, path, body, job_type, feature):
    r = served.client.post(path, json={**body, "async_process": True})
    assert r.status_code == 200, r.text
    job = assert_unsupported(served, assert_async_job(r.json(), job_type))
    assert feature in job["job_status"]


# --- query-job, job-queue, job-history ----------------------------------------------------------

def test_query_job_errors(served):
    detail = assert_validation_error(served.client.get("/v1/generation/query-job"), ["query", "job_id"], "missing")
    assert detail[0]["loc"] == ["query", "job_id"]
    r = served.client.get("/v1/generation/query-job", params={"job_id": "no-such-job"})
    assert r.status_code == 404
    assert r.json() == NOT_FOUND_JOB and list(r.json()) == list(NOT_FOUND_JOB)
    r = served.client.get("/v1/generation/query-job", params={"job_id": str(uuid.uuid4()),
                                                              "require_step_preview": "true"})
    assert r.status_code == 404 and r.json() == NOT_FOUND_JOB
    assert_validation_error(served.client.get("/v1/generation/query-job",
                                              params={"job_id": "x", "require_step_preview": "maybe"}),
                            ["query", "require_step_preview"])


def test_query_job_with_step_preview_and_job_queue(served):
    r = served.client.post("/v1/generation/text-to-image", json={"prompt": "a cat", **SMALL, "async_process": True})
    job_id = r.json()["job_id"]
    queue = served.client.get("/v1/generation/job-queue").json()
    assert list(queue) == ["running_size", "finished_size", "last_job_id"]
    assert queue["last_job_id"] == job_id and isinstance(queue["running_size"], int)
    served.wait_job(job_id)
    r = served.client.get("/v1/generation/query-job", params={"job_id": job_id, "require_step_preview": True})
    assert r.status_code == 200
    job = r.json()
    assert list(job) == JOB_KEYS and job["job_stage"] == "SUCCESS" and job["job_step_preview"] is None
    assert [list(x) for x in job["job_result"]] == [RESULT_KEYS]
    queue = served.client.get("/v1/generation/job-queue").json()
    assert queue["finished_size"] >= 1 and queue["running_size"] >= 0


def test_job_history_default_shape(served, png_result):
    r = served.client.get("/v1/generation/job-history")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"queue", "history"}
    assert body["history"], "finished jobs are listed"
    for entry in body["history"] + body["queue"]:
        assert list(entry) == HISTORY_INFO_KEYS, entry
        assert all(isinstance(entry[k], int) for k in ("in_queue_mills", "start_mills", "finish_mills"))
    for entry in body["history"]:
        assert entry["is_finished"] is True and entry["finish_mills"] >= entry["start_mills"] >= entry["in_queue_mills"]
    assert_validation_error(served.client.get("/v1/generation/job-history", params={"page": "x"}), ["query", "page"])


@pytest.fixture(scope="module")
def history_frontend(triton, tmp_path_factory):
    with served_frontend(triton.grpc_url, tmp_path_factory.mktemp("history")) as frontend:
        yield frontend


def test_job_history_pages_filter_and_delete(history_frontend):
    f = history_frontend
    assert f.client.get("/v1/generation/job-history").json() == {"queue": [], "history": []}
    ids = []
    for seed in (1, 2, 3):
        r = f.client.post("/v1/generation/text-to-image",
                          json={"prompt": "a cat", **SMALL, "image_seed": seed, "async_process": True})
        ids.append(r.json()["job_id"])
        f.wait_job(ids[-1])
    history = f.client.get("/v1/generation/job-history").json()["history"]
    assert [e["job_id"] for e in history] == ids  # oldest first
    page0 = f.client.get("/v1/generation/job-history", params={"page": 0, "page_size": 2}).json()
    page1 = f.client.get("/v1/generation/job-history", params={"page": 1, "page_size": 2}).json()
    assert [e["job_id"] for e in page0["history"]] == ids[:2]
    assert [e["job_id"] for e in page1["history"]] == ids[2:]
    far = f.client.get("/v1/generation/job-history", params={"page": 10**20, "page_size": 1000})
    assert far.status_code == 200 and far.json()["history"] == []
    one = f.client.get("/v1/generation/job-history", params={"job_id": ids[1]}).json()
    assert [e["job_id"] for e in one["history"]] == [ids[1]] and one["queue"] == []

    url = f.wait_job(ids[0])["job_result"][0]["url"]
    assert fetch(f, url).status_code == 200
    r = f.client.get("/v1/generation/job-history", params={"job_id": ids[0], "delete": "true"})
    assert r.status_code == 200 and r.json() == {"message": "Deleted"}
    assert f.client.get("/v1/generation/query-job", params={"job_id": ids[0]}).status_code == 404
    assert fetch(f, url).status_code == 404
    assert [e["job_id"] for e in f.client.get("/v1/generation/job-history").json()["history"]] == ids[1:]
    r = f.client.get("/v1/generation/job-history", params={"job_id": ids[0], "delete": True})
    assert r.json() == {"message": "Not found"}
    assert_validation_error(f.client.get("/v1/generation/job-history", params={"delete": True}),
                            ["query", "job_id"])


def test_job_history_persistent_mode(triton, tmp_path_factory):
    with served_frontend(triton.grpc_url, tmp_path_factory.mktemp("persistent"), persistent=True) as f:
        first = generate(f.client, image_seed=21, prompt="first")[0]
        second = generate(f.client, image_seed=22, prompt="second", loras=[{"model_name": "None", "weight": 0.7}])[0]
        r = f.client.get("/v1/generation/job-history")
        assert r.status_code == 200
        body = r.json()
        assert list(body) == ["history", "queue"] and body["queue"] == []
        rows = body["history"]
        assert [row["task_info"]["result_url"] for row in rows] == [second["url"], first["url"]]  # newest first
        for row in rows:
            assert list(row) == ["params", "task_info"]
            info = row["task_info"]
            assert list(info) == TASK_INFO_KEYS
            assert info["task_type"] == "Text to Image" and info["finish_reason"] == "SUCCESS"
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", info["date_time"])
            assert info["task_finish_mills"] >= info["task_start_mills"] >= info["task_in_queue_mills"] > 0
            assert UUID4.fullmatch(info["task_id"])
        params = rows[0]["params"]
        assert params["prompt"] == "second" and params["image_seed"] == 22
        assert params["loras"] == [[True, "None", 0.7]]
        page = f.client.get("/v1/generation/job-history", params={"page": 1, "page_size": 1}).json()
        assert [row["params"]["prompt"] for row in page["history"]] == ["first"]
        task_id = rows[1]["task_info"]["task_id"]
        one = f.client.get("/v1/generation/job-history", params={"job_id": task_id}).json()
        assert [row["task_info"]["task_id"] for row in one["history"]] == [task_id]
        r = f.client.get("/v1/generation/job-history", params={"job_id": task_id, "delete": True})
        assert r.json() == {"message": "Deleted"}
        assert fetch(f, first["url"]).status_code == 404


# --- stop -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_worker(triton, tmp_path_factory):
    """A frontend running one job at a time, so a second job waits."""
    with served_frontend(triton.grpc_url, tmp_path_factory.mktemp("stop"), concurrency=1) as frontend:
        yield frontend


@pytest.mark.parametrize("kwargs", [{}, {"json": {}}, {"content": b"garbage"}, {"json": [1, 2]},
                                    {"json": {"job_id": None}}, {"json": {"job_id": 5}},
                                    {"content": b'{"job_id": "x"}', "headers": {"content-type": "text/plain"}}])
def test_stop_always_answers_success(one_worker, kwargs):
    r = one_worker.client.post("/v1/generation/stop", **kwargs)
    assert r.status_code == 200 and r.json() == {"msg": "success"}
    assert list(r.json()) == ["msg"]


def test_stop_by_job_id_cancels_a_waiting_then_a_running_job(one_worker):
    f = one_worker
    long_id = f.client.post("/v1/generation/text-to-image", json=LONG).json()["job_id"]
    try:
        running = wait_running(f, long_id)
        assert list(running) == JOB_KEYS and 0 <= running["job_progress"] < 100
        preview = f.client.get("/v1/generation/query-job",
                               params={"job_id": long_id, "require_step_preview": "true"}).json()
        if preview["job_step_preview"] is not None:  # raw base64 PNG, no data: prefix (§3.5)
            assert base64.b64decode(preview["job_step_preview"])[:8] == PNG_MAGIC
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(f.client.post, "/v1/generation/text-to-image",
                                  json={"prompt": "waits", **SMALL, "image_seed": 4})
            deadline = time.monotonic() + 30
            while (waiting_id := f.client.get("/v1/generation/job-queue").json()["last_job_id"]) == long_id:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            queue = f.client.get("/v1/generation/job-history").json()["queue"]
            assert {e["job_id"] for e in queue} == {long_id, waiting_id}
            assert all(e["is_finished"] is False for e in queue)
            assert f.client.get("/v1/generation/query-job", params={"job_id": waiting_id}).json()["job_stage"] == \
                "WAITING"
            r = f.client.post("/v1/generation/stop", json={"job_id": waiting_id})
            assert r.json() == {"msg": "success"}
            cancelled = waiting.result(timeout=30)
        assert cancelled.status_code == 200
        assert cancelled.json() == [{"base64": None, "url": None, "seed": "4", "finish_reason": "USER_CANCEL"}]
        job = f.wait_job(waiting_id, timeout=10)
        assert job["job_stage"] == "ERROR" and job["job_result"] is None
        assert f.client.get("/v1/generation/query-job", params={"job_id": long_id}).json()["job_stage"] == "RUNNING"
        assert f.client.post("/v1/generation/stop", json={"job_id": long_id}).json() == {"msg": "success"}
        job = f.wait_job(long_id, timeout=30)
        assert job["job_stage"] == "ERROR" and job["job_result"] is None
    finally:
        f.client.post("/v1/generation/stop", json={"job_id": long_id})


def test_stop_without_body_cancels_the_running_job(one_worker):
    f = one_worker
    long_id = f.client.post("/v1/generation/text-to-image", json=LONG).json()["job_id"]
    try:
        wait_running(f, long_id)
        assert f.client.post("/v1/generation/stop").json() == {"msg": "success"}
        job = f.wait_job(long_id, timeout=30)
        assert job["job_stage"] == "ERROR" and job["job_result"] is None
    finally:
        f.client.post("/v1/generation/stop", json={"job_id": long_id})


# --- engines and tools ----------------------------------------------------------------------------

def test_all_models_and_refresh_models(served):
    a = served.client.get("/v1/engines/all-models")
    b = served.client.post("/v1/engines/refresh-models")
    assert a.status_code == b.status_code == 200
    assert list(a.json()) == ["model_filenames", "lora_filenames"] and a.json() == b.json()
    assert all(isinstance(n, str) for n in a.json()["model_filenames"] + a.json()["lora_filenames"])
    assert served.client.get("/v1/engines/refresh-models").status_code == 405


def test_styles(served):
    styles = served.client.get("/v1/engines/styles").json()
    assert len(styles) == 279 == len(set(styles))
    assert styles[:5] == ["Fooocus V2", "Random Style", "Fooocus Enhance", "Fooocus Semi Realistic", "Fooocus Sharp"]
    assert styles[-1] == "Mk Shepard Fairey Style" and "SAI 3D Model" in styles and "MRE Sumi E Detailed" in styles


def test_clean_vram(served):
    r = served.client.get("/v1/engines/clean_vram")
    assert r.status_code == 200 and r.json() == {"message": "ok"}


@pytest.mark.parametrize("params", [{}, {"image_type": "Anime"}, {"type": "Photo"}, {"type": "Anime"}])
def test_describe_image_is_501_json(served, params):
    r = served.client.post("/v1/tools/describe-image", params=params, files={"image": upload("bear.jpg", "image")})
    assert r.status_code == 501 and r.headers["content-type"] == "application/json"
    assert "describe-image" in r.json()["detail"] and "not supported" in r.json()["detail"]


def test_describe_image_validation(served):
    c = served.client
    assert_validation_error(c.post("/v1/tools/describe-image"), ["body", "image"])
    assert_validation_error(c.post("/v1/tools/describe-image", files={"image": ("x.png", b"")}), ["body", "image"])
    assert_validation_error(c.post("/v1/tools/describe-image", files={"image": ("x.png", b"not an image")}),
                            ["body", "image"])
    assert_validation_error(c.post("/v1/tools/describe-image", params={"image_type": "Cartoon"},
                                   files={"image": upload("bear.jpg", "image")}), ["query", "image_type"], "enum")


def test_generate_mask_is_501_json_and_validates(served):
    c = served.client
    r = c.post("/v1/tools/generate_mask", json={"image": b64("bear.jpg"), "mask_model": "sam",
                                                "dino_prompt_text": "bear"})
    assert r.status_code == 501 and r.headers["content-type"] == "application/json"
    assert "generate_mask" in r.json()["detail"] and "not supported" in r.json()["detail"]
    assert_validation_error(c.post("/v1/tools/generate_mask", json={}), ["body", "image"], "missing")
    assert_validation_error(c.post("/v1/tools/generate_mask", content=b"{bad"), ["body"])
    assert_validation_error(c.post("/v1/tools/generate_mask", json={"image": b64("bear.jpg"), "box_threshold": 2}),
                            ["body", "box_threshold"], "less_than_equal")
    assert_validation_error(c.post("/v1/tools/generate_mask", json={"image": "string"}), ["body", "image"])


# --- /files ---------------------------------------------------------------------------------------

def test_files_accept_reencodes_and_star_gives_the_original(served, png_result):
    url = png_result["result"]["url"]
    r = fetch(served, url, "image/jpeg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:3] == JPEG_MAGIC
    r = fetch(served, url, "image/webp")
    assert r.headers["content-type"] == "image/webp" and is_webp(r.content)
    for accept in ("*/*", "text/html,application/xhtml+xml,image/webp,*/*;q=0.8", "image/png"):
        r = fetch(served, url, accept)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == png_result["data"]


@pytest.mark.parametrize("path", [
    "/files/2024-01-01/missing.png", "/files/2099-12-31/00000000-0000-4000-8000-000000000000-0.png",
    "/files/..%2F..%2Fetc/passwd.png", "/files/2024-01-01/..%2F..%2Fjobs.png", "/files/%2e%2e/%2e%2e%2fx.png",
    "/files/2024-01-01/x.txt", "/files/2024-01-01/.hidden.png", "/files/a/b/c.png", "/files/x.png",
    "/files/..%5C..%5Cx/y.png",
])
def test_files_missing_or_traversal_is_404(served, path):
    r = served.client.get(httpx.URL(served.base_url + path))
    assert r.status_code == 404
    assert not r.content.startswith(PNG_MAGIC)


def test_files_traversal_cannot_reach_a_file_beside_the_output_folder(served):
    secret = Path(served.output_dir).resolve().parent / "secret-0.png"
    secret.write_bytes(PNG_MAGIC + b"secret")
    try:
        for path in ("/files/..%2Fsecret-0.png/x.png", "/files/2024-01-01/..%2F..%2Fsecret-0.png",
                     "/files/..%2F/secret-0.png", "/files/%2E%2E/secret-0.png"):
            r = served.client.get(httpx.URL(served.base_url + path))
            assert r.status_code == 404 and b"secret" not in r.content, path
    finally:
        secret.unlink()


# --- API key ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(triton, tmp_path_factory):
    with served_frontend(triton.grpc_url, tmp_path_factory.mktemp("apikey"), apikey="k") as frontend:
        yield frontend


KEYED_ROUTES = [("get", "/", {}), ("get", "/ping", {}),
                ("post", "/v1/generation/text-to-image", {"json": {"prompt": "x", **SMALL}}),
                ("post", "/v1/generation/image-upscale-vary", {"data": {"uov_method": "Upscale (2x)"}}),
                ("post", "/v1/generation/image-prompt", {"data": {}}),
                ("post", "/v2/generation/image-prompt", {"json": {"image_prompts": []}}),
                ("get", "/v1/generation/query-job", {"params": {"job_id": "x"}}),
                ("get", "/v1/generation/job-queue", {}), ("get", "/v1/generation/job-history", {}),
                ("post", "/v1/generation/stop", {}), ("get", "/v1/engines/all-models", {}),
                ("post", "/v1/engines/refresh-models", {}), ("get", "/v1/engines/styles", {}),
                ("get", "/v1/engines/clean_vram", {}), ("post", "/v1/tools/describe-image", {}),
                ("post", "/v1/tools/generate_mask", {"json": {"image": "x"}})]


@pytest.mark.parametrize("headers", [{}, {"X-API-KEY": "wrong"}, {"X-API-KEY": "K"}, {"X-API-KEY": "kk"},
                                     {"Authorization": "Bearer k"}])
def test_api_key_missing_or_wrong_is_403(keyed, headers):
    with httpx.Client(base_url=keyed.base_url, timeout=60) as c:
        for method, path, kwargs in KEYED_ROUTES:
            r = c.request(method, path, headers=headers, **kwargs)
            assert r.status_code == 403 and r.json() == {"detail": "Forbidden"}, (method, path, r.text)
        r = c.get("/v1/engines/styles", params={"apikey": "k", "X-API-KEY": "k"}, headers=headers)
        assert r.status_code == 403


def test_api_key_right_key_and_open_routes(keyed):
    with httpx.Client(base_url=keyed.base_url, timeout=120) as c:
        assert c.get("/ping", headers={"X-API-KEY": "k"}).json() == "pong"
        assert c.get("/ping", headers={"x-api-key": "k"}).status_code == 200  # header names are case-insensitive
        r = c.post("/v1/generation/text-to-image", json={"prompt": "a cat", **SMALL}, headers={"X-API-KEY": "k"})
        assert r.status_code == 200, r.text
        (result,) = r.json()
        assert result["finish_reason"] == "SUCCESS"
        # open without a key: files, docs, the OpenAPI document, CORS preflights
        r = c.get(result["url"][len(keyed.base_url):])
        assert r.status_code == 200 and r.content[:8] == PNG_MAGIC
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        r = c.options("/ping", headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "GET",
                                        "Access-Control-Request-Headers": "x-api-key"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://ui.example")


# --- upload limits ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited(triton, tmp_path_factory):
    # bear.jpg is 49,756 bytes (600x600); image_prompt-0.jpg is 35,058 bytes but 564x564 pixels.
    with served_frontend(triton.grpc_url, tmp_path_factory.mktemp("limits"), max_upload_bytes=40_000,
                         max_image_pixels=100_000) as frontend:
        yield frontend


def assert_too_large(r: httpx.Response, loc: list) -> None:
    assert r.status_code == 413, r.text
    assert r.headers["content-type"] == "application/json"
    (item,) = r.json()["detail"]
    assert item["loc"] == loc and item["type"] == "too_large"


def test_upload_too_many_bytes_is_413(limited):
    c = limited.client
    assert_too_large(c.post("/v1/generation/image-upscale-vary", data={"uov_method": "Upscale (2x)"},
                            files={"input_image": upload("bear.jpg")}), ["body", "input_image"])
    assert_too_large(c.post("/v1/generation/image-prompt", files={"cn_img2": upload("bear.jpg", "cn_img2")}),
                     ["body", "cn_img2"])
    assert_too_large(c.post("/v2/generation/image-upscale-vary", json={"input_image": b64("bear.jpg")}),
                     ["body", "input_image"])
    assert_too_large(c.post("/v2/generation/text-to-image-with-ip",
                            json={"image_prompts": [{"cn_img": "data:image/jpeg;base64," + b64("bear.jpg")}]}),
                     ["body", "image_prompts", 0, "cn_img"])
    assert_too_large(c.post("/v1/tools/describe-image", files={"image": upload("bear.jpg", "image")}),
                     ["body", "image"])


def test_upload_too_many_pixels_is_413(limited):
    c = limited.client
    assert_too_large(c.post("/v1/generation/image-inpaint-outpaint",
                            files={"input_image": upload("image_prompt-0.jpg")}), ["body", "input_image"])
    assert_too_large(c.post("/v2/generation/image-upscale-vary", json={"input_image": b64("image_prompt-0.jpg")}),
                     ["body", "input_image"])
    small = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(small, "PNG")
    r = c.post("/v2/generation/image-upscale-vary",
               json={"input_image": base64.b64encode(small.getvalue()).decode(), "async_process": True,
                     "advanced_params": {"overwrite_step": 2}})
    assert r.status_code == 200, r.text  # within both limits
    assert limited.wait_job(r.json()["job_id"])["job_stage"] == "SUCCESS"


# --- CORS, GZip ---------------------------------------------------------------------------------

def test_cors_preflight_and_simple_requests(served):
    r = served.client.options("/v1/generation/text-to-image", headers={
        "Origin": "http://ui.example:5000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-api-key"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "http://ui.example:5000")
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
    r = served.client.get("/ping", headers={"Origin": "http://ui.example:5000"})
    assert r.headers["access-control-allow-origin"] in ("*", "http://ui.example:5000")


def test_gzip_on_large_responses(served):
    with httpx.Client(base_url=served.base_url, timeout=60) as c:
        r = c.get("/v1/engines/styles", headers={"accept-encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip" and len(r.json()) == 279
        with c.stream("GET", "/v1/engines/styles", headers={"accept-encoding": "gzip"}) as s:
            body = b"".join(s.iter_raw())
        assert len(json.loads(gzip.decompress(body))) == 279
        r = c.get("/v1/engines/styles", headers={"accept-encoding": "identity"})
        assert "content-encoding" not in r.headers
        r = c.get("/ping", headers={"accept-encoding": "gzip"})  # small: not compressed
        assert "content-encoding" not in r.headers


# --- QUEUE_IS_FULL ------------------------------------------------------------------------------

def test_queue_is_full_shapes(triton, tmp_path_factory):
    with served_frontend(triton.grpc_url, tmp_path_factory.mktemp("full"), queue_size=1) as f:
        long_id = f.client.post("/v1/generation/text-to-image", json=LONG).json()["job_id"]
        try:
            assert f.client.get("/v1/generation/job-queue").json()["running_size"] == 1
            body = {"prompt": "a cat", **SMALL}
            r = f.client.post("/v1/generation/text-to-image", json=body)
            assert r.status_code == 200 and r.json() == [QUEUE_FULL_RESULT]
            assert list(r.json()[0]) == RESULT_KEYS
            r = f.client.post("/v1/generation/text-to-image", json={**body, "async_process": True})
            assert r.status_code == 200
            assert r.json() == {"job_id": "", "job_type": "Text to Image", "job_stage": "ERROR", "job_progress": 0,
                                "job_status": None, "job_step_preview": None, "job_result": [QUEUE_FULL_RESULT]}
            assert list(r.json()) == JOB_KEYS and list(r.json()["job_result"][0]) == RESULT_KEYS
            for kwargs in ({"headers": {"accept": "image/png"}}, {"params": {"accept": "image/png"}}):
                r = f.client.post("/v1/generation/text-to-image", json=body, **kwargs)
                assert r.status_code == 409 and r.text == "QUEUE_IS_FULL"
            r = f.client.post("/v1/generation/image-upscale-vary", data={"uov_method": "Upscale (2x)"},
                              files={"input_image": upload("bear.jpg")})
            assert r.status_code == 200 and r.json() == [QUEUE_FULL_RESULT]
            r = f.client.post("/v2/generation/image-prompt", json={"image_prompts": [], "async_process": True})
            assert r.json()["job_type"] == "Image Prompt" and r.json()["job_result"] == [QUEUE_FULL_RESULT]
            assert f.client.get("/v1/generation/job-queue").json()["running_size"] == 1
        finally:
            assert f.client.post("/v1/generation/stop", json={"job_id": long_id}).json() == {"msg": "success"}
        job = f.wait_job(long_id, timeout=30)
        assert job["job_stage"] == "ERROR"
