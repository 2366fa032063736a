"""Fooocus-API's routes (contract §1): generation v1 (JSON text-to-image, multipart image routes)
and v2 (JSON, images as base64/data-URI/URL), job queries, engines, tools and files."""
from __future__ import annotations

import asyncio

import os
from pathlib import Path

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from pipeline.styles import STYLE_NAMES

from . import protocol as p
from .auth import require_api_key
from .forms import form_openapi, read_form
from .jobs import JobManager
from .serving import (IMAGE_PARAMS, b64_image, b64_upload, base_params, image_prompt, job_response,
                      pad_image_prompts, run_generation)

router = APIRouter(dependencies=[Depends(require_api_key)])
files_router = APIRouter()

GENERATION_RESPONSES = {200: {"description": "A list of results (sync), an AsyncJobResponse (async_process), "
                                             "or PNG bytes (Accept: image/png)",
                              "content": {"application/json": {}, "image/png": {}}}}


def jobs(request: Request) -> JobManager:
    return request.app.state.jobs


def limits(request: Request):
    return request.app.state.image_limits


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def home():
    return HTMLResponse('Swagger-UI to: <a href="/docs">/docs</a>')


@router.get("/ping", summary="Returns a simple 'pong'")
async def ping() -> str:
    return "pong"


# --- v1 generation ------------------------------------------------------------------------------

@router.post("/v1/generation/text-to-image", responses=GENERATION_RESPONSES, summary="Text to image")
async def text_to_image(request: Request, req: p.CommonRequest, accept: str | None = Query(None)):
    return await run_generation(request, p.TaskType.text_2_img, req, base_params(req), accept)


UOV_FILES = {"input_image": True}


@router.post("/v1/generation/image-upscale-vary", responses=GENERATION_RESPONSES,
             openapi_extra=form_openapi(p.ImgUpscaleOrVaryForm, UOV_FILES), summary="Image upscale or vary")
async def image_upscale_vary_v1(request: Request, accept: str | None = Query(None)):
    req, files = await read_form(request, p.ImgUpscaleOrVaryForm, UOV_FILES)
    params = base_params(req)
    params["uov_input_image"] = await b64_upload(files["input_image"], "input_image", limits(request))
    return await run_generation(request, p.TaskType.img_uov, req, params, accept)


INPAINT_FILES = {"input_image": True, "input_mask": False}


def inpaint_params(req, image: str | None, mask: str | None) -> dict:
    params = base_params(req)
    params.update(inpaint_input_image=image, inpaint_mask_image=mask,
                  inpaint_additional_prompt=req.inpaint_additional_prompt or "")
    for side in ("left", "right", "top", "bottom"):
        value = getattr(req, f"outpaint_distance_{side}")
        params[f"outpaint_distance_{side}"] = 0 if value is None else value
    return params


@router.post("/v1/generation/image-inpaint-outpaint", responses=GENERATION_RESPONSES,
             openapi_extra=form_openapi(p.ImgInpaintOrOutpaintForm, INPAINT_FILES), summary="Inpaint or outpaint")
async def image_inpaint_outpaint_v1(request: Request, accept: str | None = Query(None)):
    req, files = await read_form(request, p.ImgInpaintOrOutpaintForm, INPAINT_FILES)
    lim = limits(request)
    params = inpaint_params(req, await b64_upload(files["input_image"], "input_image", lim),
                            await b64_upload(files["input_mask"], "input_mask", lim))
    return await run_generation(request, p.TaskType.img_inpaint_outpaint, req, params, accept)


IP_FILES = {"input_image": False, "input_mask": False, "cn_img1": False, "cn_img2": False, "cn_img3": False,
            "cn_img4": False}


@router.post("/v1/generation/image-prompt", responses=GENERATION_RESPONSES,
             openapi_extra=form_openapi(p.ImgPromptForm, IP_FILES), summary="Image prompt")
async def image_prompt_v1(request: Request, accept: str | None = Query(None)):
    req, files = await read_form(request, p.ImgPromptForm, IP_FILES, ignore={"image_prompts"})
    lim = limits(request)
    params = inpaint_params(req, await b64_upload(files["input_image"], "input_image", lim),
                            await b64_upload(files["input_mask"], "input_mask", lim))
    prompts = []
    for n in range(1, 5):
        img = await b64_upload(files[f"cn_img{n}"], f"cn_img{n}", lim)
        prompts.append(image_prompt(img, getattr(req, f"cn_stop{n}"), getattr(req, f"cn_weight{n}"),
                                    getattr(req, f"cn_type{n}")))
    for key in [k for k in params if k[:5] in ("cn_st", "cn_we", "cn_ty")]:
        del params[key]
    params["image_prompts"] = pad_image_prompts(prompts)
    set_mixing(params)
    return await run_generation(request, p.TaskType.img_prompt, req, params, accept)


ENHANCE_FILES = {"enhance_input_image": True}


@router.post("/v1/generation/image-enhance", responses=GENERATION_RESPONSES,
             openapi_extra=form_openapi(p.ImageEnhanceForm, ENHANCE_FILES), summary="Image enhance")
async def image_enhance_v1(request: Request, accept: str | None = Query(None)):
    req, files = await read_form(request, p.ImageEnhanceForm, ENHANCE_FILES)
    params = base_params(req)
    ctrlnets = []
    for n in (1, 2, 3):
        ctrlnets.append({name: params.pop(f"{name}_{n}") for name in p.EnhanceCtrlNets.model_fields})
    params["enhance_ctrlnets"] = ctrlnets
    params["enhance_input_image"] = await b64_upload(files["enhance_input_image"], "enhance_input_image",
                                                     limits(request))
    params["image_number"] = 1
    return await run_generation(request, p.TaskType.img_enhance, req, params, accept)


# --- v2 generation ------------------------------------------------------------------------------

async def v2_image_prompts(request: Request, prompts: list[p.ImagePromptJson]) -> list[dict]:
    out = []
    for i, ip in enumerate(prompts):
        img = await b64_image(ip.cn_img, f"image_prompts.{i}.cn_img", limits(request))
        out.append(image_prompt(img, ip.cn_stop, ip.cn_weight, ip.cn_type))
    return pad_image_prompts(out)


def set_mixing(params: dict) -> None:
    """§4.3: image prompts together with an input image switch the mixing flags on."""
    has_prompts = any(ip["cn_img"] for ip in params.get("image_prompts", []))
    adv = params.setdefault("advanced_params", {})
    if has_prompts and params.get("uov_input_image"):
        adv["mixing_image_prompt_and_vary_upscale"] = True
    if has_prompts and params.get("inpaint_input_image"):
        adv["mixing_image_prompt_and_inpaint"] = True


@router.post("/v2/generation/text-to-image-with-ip", responses=GENERATION_RESPONSES,
             summary="Text to image with image prompts")
async def text_to_image_with_ip(request: Request, req: p.Text2ImgRequestWithPrompt, accept: str | None = Query(None)):
    params = base_params(req, exclude={"image_prompts"})
    params["image_prompts"] = await v2_image_prompts(request, req.image_prompts)
    return await run_generation(request, p.TaskType.text_2_img, req, params, accept)


@router.post("/v2/generation/image-upscale-vary", responses=GENERATION_RESPONSES, summary="Image upscale or vary")
async def image_upscale_vary_v2(request: Request, req: p.ImgUpscaleOrVaryRequestJson, accept: str | None = Query(None)):
    params = base_params(req, exclude={"input_image", "image_prompts"})
    params["uov_input_image"] = await b64_image(req.input_image, "input_image", limits(request))
    params["image_prompts"] = await v2_image_prompts(request, req.image_prompts)
    set_mixing(params)
    return await run_generation(request, p.TaskType.img_uov, req, params, accept)


async def v2_inpaint_params(request: Request, req) -> dict:
    lim = limits(request)
    params = inpaint_params(req, await b64_image(req.input_image, "input_image", lim),
                            await b64_image(req.input_mask, "input_mask", lim))
    for key in ("input_image", "input_mask"):
        params.pop(key, None)
    params["image_prompts"] = await v2_image_prompts(request, req.image_prompts)
    set_mixing(params)
    return params


@router.post("/v2/generation/image-inpaint-outpaint", responses=GENERATION_RESPONSES, summary="Inpaint or outpaint")
async def image_inpaint_outpaint_v2(request: Request, req: p.ImgInpaintOrOutpaintRequestJson,
                                    accept: str | None = Query(None)):
    params = await v2_inpaint_params(request, req)
    return await run_generation(request, p.TaskType.img_inpaint_outpaint, req, params, accept)


@router.post("/v2/generation/image-prompt", responses=GENERATION_RESPONSES, summary="Image prompt")
async def image_prompt_v2(request: Request, req: p.ImgPromptRequestJson, accept: str | None = Query(None)):
    params = await v2_inpaint_params(request, req)
    return await run_generation(request, p.TaskType.img_prompt, req, params, accept)


@router.post("/v2/generation/image-enhance", responses=GENERATION_RESPONSES, summary="Image enhance")
async def image_enhance_v2(request: Request, req: p.ImageEnhanceRequestJson, accept: str | None = Query(None)):
    params = base_params(req, exclude={"enhance_input_image"})
    image = await b64_image(req.enhance_input_image, "enhance_input_image", limits(request))
    if image is None:
        raise RequestValidationError([{"type": "missing", "loc": ("body", "enhance_input_image"),
                                       "msg": "An input image is required", "input": req.enhance_input_image}])
    params["enhance_input_image"] = image
    params["enhance_ctrlnets"] = params["enhance_ctrlnets"][:3]
    params["image_number"] = 1
    return await run_generation(request, p.TaskType.img_enhance, req, params, accept)


# --- jobs ---------------------------------------------------------------------------------------

NOT_FOUND = {"job_id": "", "job_type": p.TaskType.not_found.value, "job_stage": p.AsyncJobStage.error.value,
             "job_progress": 0, "job_status": "Job not found", "job_step_preview": None, "job_result": None}


@router.get("/v1/generation/query-job", response_model=p.AsyncJobResponse, summary="Query async generation job",
            responses={404: {"description": "Unknown job id"}})
async def query_job(request: Request, job_id: str = Query(...), require_step_preview: bool = False):
    view = await jobs(request).get(job_id)
    if view is None:
        return JSONResponse(NOT_FOUND, status_code=404)
    return job_response(view, request.app.state.files, require_step_preview)


@router.get("/v1/generation/job-queue", response_model=p.JobQueueInfo, summary="Query job queue info")
async def job_queue(request: Request):
    store = jobs(request).store
    # Database reads run off the event loop, like every other store access (PostgreSQL round trips).
    running, finished, last = await asyncio.gather(
        asyncio.to_thread(store.count, finished=False), asyncio.to_thread(store.count, finished=True),
        asyncio.to_thread(store.last_job_id))
    return p.JobQueueInfo(running_size=running, finished_size=finished, last_job_id=last)


def history_info(record) -> dict:
    return {"job_id": record.job_id, "in_queue_mills": record.in_queue_mills, "start_mills": record.start_mills,
            "finish_mills": record.finish_mills, "is_finished": record.finished}


def persistent_row(record) -> dict:
    """§3.7/§4.4: the stored request columns and the task info."""
    from datetime import datetime

    params = {k: v for k, v in record.params.items() if k not in IMAGE_PARAMS}
    params["image_prompts"] = [[ip.get("cn_stop"), ip.get("cn_weight"), ip.get("cn_type")]
                               for ip in params.get("image_prompts", []) if ip.get("cn_img")]
    params["loras"] = [[lo.get("enabled", True), lo.get("model_name"), lo.get("weight")]
                       for lo in params.get("loras", [])]
    params.update(webhook_url=record.options.get("webhook_url"), require_base64=record.options.get("require_base64"))
    return {"params": params, "task_info": {
        "task_id": record.job_id, "task_type": record.job_type, "task_in_queue_mills": record.in_queue_mills,
        "task_start_mills": record.start_mills, "task_finish_mills": record.finish_mills,
        "result_url": ",".join(r["url"] for r in record.results), "finish_reason": record.finish_reason,
        "date_time": datetime.fromtimestamp(record.in_queue_mills / 1000).strftime("%Y-%m-%d %H:%M:%S")}}


MAX_OFFSET = 2**62


@router.get("/v1/generation/job-history", summary="Query historical job data")
async def job_history(request: Request, job_id: str | None = None, page: int = Query(0, ge=0),
                      page_size: int = Query(20, ge=1, le=1000), delete: bool = False):
    manager = jobs(request)
    if delete:
        if not job_id:
            raise RequestValidationError([{"type": "missing", "loc": ("query", "job_id"),
                                           "msg": "job_id is required with delete=true", "input": None}])
        return {"message": "Deleted" if await manager.delete(job_id) else "Not found"}
    store = manager.store
    queue = [history_info(r) for r in await asyncio.to_thread(store.list, finished=False, job_id=job_id)]
    # Any page is valid (past the end it is empty), but the database's OFFSET is a 64-bit integer.
    offset = min(page * page_size, MAX_OFFSET)
    persistent = request.app.state.settings.persistent
    rows = await asyncio.to_thread(store.list, finished=True, job_id=job_id, offset=offset, limit=page_size,
                                   newest_first=persistent)
    if persistent:
        return {"history": [persistent_row(r) for r in rows], "queue": queue}
    return p.JobHistoryResponse(queue=queue, history=[history_info(r) for r in rows])


class StopRequest(p.Request):
    job_id: str | None = None


STOP_BODY = {"requestBody": {"required": False, "content": {"application/json": {
    "schema": StopRequest.model_json_schema()}}}}


@router.post("/v1/generation/stop", response_model=p.StopResponse, summary="Stop the running job(s), or one job",
             openapi_extra=STOP_BODY)
async def stop(request: Request):
    """Fooocus-API: stops the running job(s); whatever body is sent is ignored. Beyond it:
    {"job_id": "<id>"} cancels that one job, waiting or running."""
    await jobs(request).cancel(await _stop_job_id(request))
    return {"msg": "success"}


async def _stop_job_id(request: Request) -> str | None:
    """The job_id of a {"job_id": ...} body; None for no body or any other body (not an error:
    Fooocus-API ignores the body of stop)."""
    import json

    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    job_id = body.get("job_id") if isinstance(body, dict) else None
    if job_id is None or isinstance(job_id, (dict, list)) or job_id == "":
        return None
    return str(job_id)


# --- engines and tools --------------------------------------------------------------------------

MODEL_EXTENSIONS = (".pth", ".ckpt", ".bin", ".safetensors", ".fooocus.patch")


def model_files(folder: Path | None) -> list[str]:
    if folder is None or not folder.is_dir():
        return []
    names = [str(path.relative_to(folder)).replace(os.sep, "/") for path in folder.rglob("*")
             if path.is_file() and path.name.lower().endswith(MODEL_EXTENSIONS)]
    return sorted(names, key=str.casefold)


@router.get("/v1/engines/all-models", response_model=p.AllModelsResponse, summary="All model filenames")
async def all_models(request: Request):
    s = request.app.state.settings
    names = model_files(s.checkpoints_dir)
    if s.served_checkpoint and s.served_checkpoint not in names:
        names = sorted([*names, s.served_checkpoint], key=str.casefold)
    return p.AllModelsResponse(model_filenames=names, lora_filenames=model_files(s.loras_dir))


@router.post("/v1/engines/refresh-models", response_model=p.AllModelsResponse,
             summary="Refresh local files (answered like all-models)")
async def refresh_models(request: Request):
    return await all_models(request)


@router.get("/v1/engines/styles", response_model=list[str], summary="Get all legal Fooocus styles")
async def styles():
    return list(STYLE_NAMES)


@router.get("/v1/engines/clean_vram", summary="Release cached memory")
async def clean_vram():
    """Models are owned by Triton and stay loaded between jobs by design; there is no per-request
    cache in the frontend to release."""
    return {"message": "ok"}


def not_supported(feature: str) -> JSONResponse:
    return JSONResponse({"detail": f"{feature} is not supported by this server yet"}, status_code=501)


@router.post("/v1/tools/describe-image", response_model=p.DescribeImageResponse, summary="Describe an image",
             responses={501: {"description": "No describe model is served"}})
async def describe_image(request: Request, image: UploadFile = File(...),
                         image_type: p.DescribeImageType = Query(p.DescribeImageType.photo),
                         type: p.DescribeImageType | None = Query(None, description="old name of image_type")):
    if await b64_upload(image, "image", limits(request)) is None:  # validated like every upload
        raise RequestValidationError([{"type": "missing", "loc": ("body", "image"),
                                       "msg": "An image is required (the uploaded file is empty)", "input": None}])
    return not_supported("describe-image (BLIP / WD14 captioning)")


@router.post("/v1/tools/generate_mask", response_model=str, summary="Generate a mask",
             responses={501: {"description": "No segmentation model is served"}})
async def generate_mask(request: Request, req: p.GenerateMaskRequest):
    if await b64_image(req.image, "image", limits(request)) is None:
        raise RequestValidationError([{"type": "missing", "loc": ("body", "image"),
                                       "msg": "An image is required", "input": req.image}])
    return not_supported("generate_mask (rembg / SAM segmentation)")


# --- files (not behind the API key) -------------------------------------------------------------

@files_router.get("/files/{date}/{file_name}", summary="Get a generated file",
                  responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
                             404: {"description": "No such file"}})
async def get_file(date: str, file_name: str, request: Request):
    files = request.app.state.files
    path = files.lookup(date, file_name)
    if path is None:
        return Response(status_code=404)
    data, media = files.reencode(path, request.headers.get("accept"))
    return Response(data, media_type=media)
