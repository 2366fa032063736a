"""Fooocus-API routes (the text-to-image spine: generation, query-job, job-queue, files, ping)."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from .jobs import Job, JobManager
from .protocol import (AsyncJobResponse, AsyncJobStage, CommonRequest, GeneratedImageResult,
                       GenerationFinishReason, JobQueueInfo, TaskType)

router = APIRouter()
files_router = APIRouter()


def manager(request: Request) -> JobManager:
    return request.app.state.jobs


def job_response(job: Job) -> AsyncJobResponse:
    return AsyncJobResponse(
        job_id=job.job_id, job_type=job.job_type, job_stage=job.stage, job_progress=job.progress,
        job_status=job.status, job_step_preview=None,
        job_result=job.results if job.stage == AsyncJobStage.success else None)


def task_params(req: CommonRequest) -> dict:
    return req.model_dump(mode="json")


@router.get("/ping", summary="Returns a simple 'pong'")
async def ping() -> str:
    return "pong"


@router.post("/v1/generation/text-to-image", response_model=list[GeneratedImageResult] | AsyncJobResponse,
             summary="Text to image")
async def text_to_image(req: CommonRequest, request: Request):
    jobs = manager(request)
    job = jobs.submit(task_params(req), TaskType.text_2_img, require_base64=req.require_base64)
    if req.async_process:
        return job_response(job)
    await job.done.wait()
    if job.finish_reason == GenerationFinishReason.success:
        return job.results
    return job.error_results(job.finish_reason)


@router.post("/v1/generation/stop", summary="Stop the running job(s)")
async def stop(request: Request):
    jobs = manager(request)
    for job in jobs.unfinished():
        if job.stage == AsyncJobStage.running:
            jobs.cancel(job.job_id)
    return {"msg": "success"}


NOT_FOUND = {"job_id": "", "job_type": TaskType.not_found.value, "job_stage": AsyncJobStage.error.value,
             "job_progress": 0, "job_status": "Job not found", "job_step_preview": None, "job_result": None}


@router.get("/v1/generation/query-job", response_model=AsyncJobResponse, summary="Query async generation job")
async def query_job(request: Request, job_id: str = Query(...), require_step_preview: bool = False):
    job = manager(request).get(job_id)
    if job is None:
        return JSONResponse(NOT_FOUND, status_code=404)
    return job_response(job)


@router.get("/v1/generation/job-queue", response_model=JobQueueInfo, summary="Query job queue info")
async def job_queue(request: Request):
    jobs = manager(request)
    return JobQueueInfo(running_size=len(jobs.unfinished()), finished_size=len(jobs.finished()),
                        last_job_id=jobs.last_job_id)


@files_router.get("/files/{date}/{file_name}", summary="Get a generated file")
async def get_file(date: str, file_name: str, request: Request):
    path = request.app.state.files.lookup(date, file_name)
    if path is None:
        return Response(status_code=404)
    return FileResponse(path, media_type=f"image/{path.suffix[1:].replace('jpg', 'jpeg')}")
