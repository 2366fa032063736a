"""The job lifecycle: admission, a queue served by several concurrent workers (Triton batches and
interleaves their model calls), progress from the pipeline's event stream, results as files, and
an end for every job: SUCCESS, ERROR with a reason, or USER_CANCEL."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from .files import OutputFiles, data_uri
from .protocol import AsyncJobStage, GeneratedImageResult, GenerationFinishReason, TaskType
from .triton_client import TritonJobError, TritonPipelineClient

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Job:
    job_id: str
    job_type: TaskType
    params: dict  # the task sent to the pipeline (the request's fields)
    require_base64: bool = False
    stage: AsyncJobStage = AsyncJobStage.waiting
    progress: int = 0
    status: str | None = None
    results: list[GeneratedImageResult] = field(default_factory=list)
    finish_reason: GenerationFinishReason | None = None
    error: str | None = None
    in_queue_mills: int = field(default_factory=now_ms)
    start_mills: int = 0
    finish_mills: int = 0
    cancel_requested: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def error_results(self, reason: GenerationFinishReason) -> list[GeneratedImageResult]:
        """What a sync caller gets for a job that did not succeed (Fooocus-API v0.4 shape)."""
        return [GeneratedImageResult(seed=str(self.params.get("image_seed", -1)), finish_reason=reason)]


class JobManager:
    def __init__(self, client: TritonPipelineClient, files: OutputFiles, concurrency: int = 2,
                 ready_timeout_s: float = 180.0):
        self.client = client
        self.files = files
        self.concurrency = max(1, concurrency)
        self.ready_timeout_s = ready_timeout_s
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.last_job_id: str | None = None
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._workers: list[asyncio.Task] = []
        self._running: dict[str, asyncio.Task] = {}

    async def start(self) -> None:
        self._workers = [asyncio.create_task(self._worker(), name=f"job-worker-{i}") for i in range(self.concurrency)]

    async def stop(self) -> None:
        for task in list(self._running.values()) + self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self.client.close()

    # Admission and queries

    def submit(self, params: dict, job_type: TaskType = TaskType.text_2_img, require_base64: bool = False) -> Job:
        job = Job(job_id=str(uuid.uuid4()), job_type=job_type, params=params, require_base64=require_base64)
        self.jobs[job.job_id] = job
        self.last_job_id = job.job_id
        self._queue.put_nowait(job)
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def unfinished(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.finished]

    def finished(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.finished]

    def cancel(self, job_id: str) -> bool:
        """Cancel a waiting or running job; it ends as USER_CANCEL."""
        job = self.jobs.get(job_id)
        if job is None or job.finished:
            return False
        job.cancel_requested = True
        running = self._running.get(job_id)
        if running is not None:
            running.cancel()  # closes the gRPC stream -> Triton cancels the request
        return True

    # Execution

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            if job.cancel_requested:
                self._finish(job, AsyncJobStage.error, GenerationFinishReason.user_cancel, "Cancelled")
                continue
            task = asyncio.create_task(self._execute(job), name=f"job-{job.job_id}")
            self._running[job.job_id] = task
            try:
                await asyncio.wait({task})  # the worker itself is only cancelled at shutdown
            finally:
                self._running.pop(job.job_id, None)
            if not job.finished:  # cancelled before the stream produced anything
                self._finish(job, AsyncJobStage.error, GenerationFinishReason.user_cancel, "Cancelled")

    async def _execute(self, job: Job) -> None:
        job.stage = AsyncJobStage.running
        job.start_mills = now_ms()
        job.status = "Waiting for Triton ..."
        try:
            await self.client.wait_ready(self.ready_timeout_s)
            async for event in self.client.run(job.params, job.job_id):
                await self._on_event(job, event.data, event.image)
            job.progress, job.status = 100, "Finished"
            self._finish(job, AsyncJobStage.success, GenerationFinishReason.success, None)
        except asyncio.CancelledError:
            reason = "Cancelled" if job.cancel_requested else "Server shutting down"
            self._finish(job, AsyncJobStage.error, GenerationFinishReason.user_cancel
                         if job.cancel_requested else GenerationFinishReason.error, reason)
            raise
        except TritonJobError as exc:
            self._finish(job, AsyncJobStage.error, GenerationFinishReason.error, str(exc))
        except Exception as exc:  # never leave a job without an end
            log.exception("job %s failed", job.job_id)
            self._finish(job, AsyncJobStage.error, GenerationFinishReason.error, f"{type(exc).__name__}: {exc}")

    async def _on_event(self, job: Job, data: dict, image) -> None:
        kind = data.get("type")
        if kind == "progress":
            job.progress = max(job.progress, min(99, int(data.get("progress", job.progress))))
            job.status = data.get("status", job.status)
        elif kind == "result" and image is not None:
            index = int(data["image_index"])
            total = int(job.params.get("image_number", 1))
            job.status = f"Saving image {index + 1}/{total} to system ..."
            _, url, png = await asyncio.to_thread(self.files.save_png, image, job.job_id, index)
            job.results.append(GeneratedImageResult(
                base64=data_uri(png) if job.require_base64 else None, url=url, seed=str(data["seed"]),
                finish_reason=GenerationFinishReason.success))

    def _finish(self, job: Job, stage: AsyncJobStage, reason: GenerationFinishReason, error: str | None) -> None:
        if job.finished:
            return
        job.stage, job.finish_reason, job.error = stage, reason, error
        if error:
            job.status = error
        job.finish_mills = now_ms()
        job.done.set()
        log.info("job %s: %s%s", job.job_id, reason.value, f" ({error})" if error else "")
