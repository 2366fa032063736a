"""Generation requests: request model -> pipeline task (images decoded and checked) -> job ->
the response shape the client asked for (sync list, async job, or streamed PNG)."""
from __future__ import annotations

import logging
from pathlib import Path

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from pipeline.metadata import build_parameters, image_info

from .files import OutputFiles, data_uri
from .images import ImageInputError, ImageLimits, image_to_png_b64, load_image_input, load_upload
from .jobs import JobManager, JobView
from .protocol import (AsyncJobResponse, CommonRequest, ControlNetType, GeneratedImageResult,
                       GenerationFinishReason, TaskType)
from .store import SUCCESS, JobRecord

log = logging.getLogger(__name__)

MAX_IMAGE_PROMPTS = 4
# Fields that hold images: kept out of stored parameter views (history) because of their size.
IMAGE_PARAMS = ("uov_input_image", "inpaint_input_image", "inpaint_mask_image", "enhance_input_image")


class ImageTooLarge(Exception):
    def __init__(self, error: ImageInputError):
        self.error = error


def field_loc(field: str) -> tuple:
    """A dotted field name as a pydantic error location: "image_prompts.0.cn_img" ->
    ("body", "image_prompts", 0, "cn_img") (list indexes are ints, as in pydantic's own errors)."""
    return ("body", *(int(part) if part.isdigit() else part for part in field.split(".")))


def image_error(error: ImageInputError) -> Exception:
    """413 for too many bytes/pixels, else a 422 that names the field."""
    if error.status == 413:
        return ImageTooLarge(error)
    loc = field_loc(error.field)
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": str(error), "input": None}])


async def b64_image(value: str | None, field: str, limits: ImageLimits) -> str | None:
    try:
        image = await load_image_input(value, field, limits)
    except ImageInputError as exc:
        raise image_error(exc) from None
    return image_to_png_b64(image) if image is not None else None


async def b64_upload(upload, field: str, limits: ImageLimits) -> str | None:
    try:
        image = await load_upload(upload, field, limits)
    except ImageInputError as exc:
        raise image_error(exc) from None
    return image_to_png_b64(image) if image is not None else None


def image_prompt(cn_img: str | None, stop, weight, cn_type) -> dict:
    return {"cn_img": cn_img, "cn_stop": stop, "cn_weight": weight,
            "cn_type": cn_type.value if isinstance(cn_type, ControlNetType) else cn_type}


def pad_image_prompts(prompts: list[dict]) -> list[dict]:
    """Fooocus-API: entries without an image are dropped; the list is padded/cut to 4 slots."""
    prompts = [p for p in prompts if p.get("cn_img")][:MAX_IMAGE_PROMPTS]
    return prompts + [image_prompt(None, None, None, ControlNetType.cn_ip)] * (MAX_IMAGE_PROMPTS - len(prompts))


def base_params(req: CommonRequest, exclude: set[str] = frozenset()) -> dict:
    params = req.model_dump(mode="json", exclude=exclude | {"async_process", "require_base64", "webhook_url",
                                                            "save_meta", "meta_scheme", "save_extension",
                                                            "save_name"})
    params["loras"] = params["loras"][:5]
    return params


def job_options(req: CommonRequest) -> dict:
    scheme = req.meta_scheme if req.meta_scheme in ("fooocus", "a1111") else "fooocus"
    ext = req.save_extension.lower() if req.save_extension.lower() in ("png", "jpg", "jpeg", "webp") else "png"
    return {"require_base64": req.require_base64, "webhook_url": req.webhook_url or None,
            "save_meta": req.save_meta, "meta_scheme": scheme, "save_extension": ext, "save_name": req.save_name}


def result_models(record: JobRecord, files: OutputFiles) -> list[GeneratedImageResult]:
    out = []
    for r in record.results:
        b64 = None
        if record.options.get("require_base64"):
            path = files.root / r["path"]
            if path.is_file():
                b64 = data_uri(path.read_bytes(), r.get("ext", "png"))
        out.append(GeneratedImageResult(base64=b64, url=r["url"], seed=str(r["seed"]),
                                        finish_reason=GenerationFinishReason(r["finish_reason"])))
    return out


def job_response(view: JobView, files: OutputFiles, with_preview: bool = False) -> AsyncJobResponse:
    record = view.record
    return AsyncJobResponse(
        job_id=record.job_id, job_type=record.job_type, job_stage=record.stage, job_progress=view.progress,
        job_status=view.status, job_step_preview=view.preview if with_preview else None,
        job_result=result_models(record, files) if record.stage == SUCCESS else None)


def queue_full(job_type: str, streaming: bool, async_process: bool):
    full = {"base64": None, "url": None, "seed": "", "finish_reason": "QUEUE_IS_FULL"}
    if streaming:
        return Response("QUEUE_IS_FULL", status_code=409, media_type="text/plain")
    if async_process:
        return {"job_id": "", "job_type": job_type, "job_stage": "ERROR", "job_progress": 0, "job_status": None,
                "job_step_preview": None, "job_result": [full]}
    return [full]


def wants_png(request: Request, accept_query: str | None) -> bool:
    accept = accept_query if accept_query else request.headers.get("accept", "")
    return accept == "image/png"


async def run_generation(request: Request, job_type: TaskType, req: CommonRequest, params: dict,
                         accept_query: str | None):
    jobs: JobManager = request.app.state.jobs
    files: OutputFiles = request.app.state.files
    streaming = wants_png(request, accept_query)
    if streaming:
        params["image_number"] = 1
    request.app.state.apply_preset(params, req)
    record = await jobs.submit(job_type.value, params, job_options(req))
    if record is None:
        return queue_full(job_type.value, streaming, req.async_process and not streaming)
    if req.async_process and not streaming:
        return job_response(JobView(record, 0, None, None), files)
    final = await jobs.wait(record.job_id)
    reason = final.finish_reason or "ERROR"
    if streaming:
        if reason == "SUCCESS" and final.results:
            data, media = files.reencode(files.root / final.results[0]["path"], "image/png")
            return Response(data, media_type=media)
        if reason == "USER_CANCEL":
            return Response("USER_CANCEL", status_code=400, media_type="text/plain")
        return Response("ERROR", status_code=500, media_type="text/plain")
    if reason == "SUCCESS":
        return result_models(final, files)
    return [GeneratedImageResult(seed=str(final.params.get("image_seed", -1)),
                                 finish_reason=GenerationFinishReason(reason))]


def save_result(files: OutputFiles, record: JobRecord, data: dict, image) -> dict:
    """The JobManager's result hook: write one image with the job's save options."""
    opts = record.options
    index = int(data["image_index"])
    metadata = None
    if opts.get("save_meta"):
        info = image_info(record.params, seed=int(data["seed"]), steps=data.get("steps"),
                          width=data.get("width"), height=data.get("height"), sampler=data.get("sampler"),
                          scheduler=data.get("scheduler"), full_prompt=data.get("full_prompt"),
                          full_negative_prompt=data.get("full_negative_prompt"), styles=data.get("styles"),
                          prompt_expansion=data.get("prompt_expansion") or "",
                          # the LoRAs the pipeline applied (missing files skipped, prompt tags added)
                          loras=[tuple(x) for x in data["loras"]] if data.get("loras") is not None else None)
        metadata = build_parameters(info, opts.get("meta_scheme", "fooocus"))
    stem = files.safe_stem(opts.get("save_name") or "", record.job_id)
    saved = files.save(image, stem, index, ext=opts.get("save_extension", "png"), metadata=metadata,
                       scheme=opts.get("meta_scheme", "fooocus"))
    return {"url": saved.url, "seed": str(data["seed"]), "finish_reason": "SUCCESS",
            "path": str(Path(saved.path).relative_to(files.root)), "ext": saved.ext}
