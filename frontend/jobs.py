"""The job lifecycle over the `JobStore`: admission (--queue-size), workers that claim jobs and run
them on Triton (several at once, so Triton interleaves and batches their model calls), progress,
results as files, webhooks, history trimming, and an end for every job: SUCCESS, ERROR with a
reason, or USER_CANCEL (stage ERROR, as Fooocus-API v0.4)."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from .files import OutputFiles
from .store import ERROR, SUCCESS, JobRecord, JobStore
from .triton_client import TritonJobError, TritonPipelineClient

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_S = 0.25  # progress reaches the database at most this often per job


@dataclass
class LiveJob:
    """What this process knows about a job it is running, fresher than the database."""

    record: JobRecord
    task: asyncio.Task | None = None
    progress: int = 0
    status: str | None = None
    preview: str | None = None
    results: list[dict] = field(default_factory=list)
    cancel_requested: bool = False
    last_write: float = 0.0
    last_step: float | None = None  # monotonic time of the previous sampling step


@dataclass
class JobView:
    """A job as the API shows it: the database record with live progress merged in."""

    record: JobRecord
    progress: int
    status: str | None
    preview: str | None

    @property
    def job_id(self) -> str:
        return self.record.job_id


class JobManager:
    def __init__(self, store: JobStore, client: TritonPipelineClient, files: OutputFiles, *, webhooks=None,
                 global_webhook_url: str | None = None, concurrency: int = 2, queue_size: int = 100,
                 queue_history: int = 0, owner: str | None = None, ready_timeout_s: float = 180.0,
                 heartbeat_s: float = 2.0, stale_after_s: float = 60.0, result_hook=None, metrics=None):
        self.store = store
        self.client = client
        self.files = files
        self.webhooks = webhooks
        self.global_webhook_url = global_webhook_url or None
        self.concurrency = max(1, concurrency)
        self.queue_size = max(1, queue_size)
        self.queue_history = max(0, queue_history)
        self.owner = owner or f"frontend-{uuid.uuid4()}"
        self.ready_timeout_s = ready_timeout_s
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.result_hook = result_hook  # (job record, event data, image) -> saved result dict
        self.metrics = metrics  # frontend.metrics.Metrics or None
        self.live: dict[str, LiveJob] = {}
        self._finished_events: dict[str, asyncio.Event] = {}
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # Lifecycle

    async def start(self) -> None:
        interrupted = await asyncio.to_thread(self.store.recover, self.owner, int(self.stale_after_s * 1000))
        for job_id in interrupted:
            log.warning("job %s was running when its frontend stopped; it ends as ERROR", job_id)
        self._tasks = [asyncio.create_task(self._worker(i), name=f"job-worker-{i}") for i in range(self.concurrency)]
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="job-heartbeat"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for live in list(self.live.values()):
            if live.task:
                live.task.cancel()
        await asyncio.gather(*self._tasks, *[lv.task for lv in self.live.values() if lv.task],
                             return_exceptions=True)
        if self.webhooks is not None:
            await self.webhooks.stop()
        await self.client.close()

    # API operations

    async def submit(self, job_type: str, params: dict, options: dict) -> JobRecord | None:
        """Queue a job; None when --queue-size jobs are already waiting or running."""
        job_id = str(uuid.uuid4())
        self._finished_events[job_id] = asyncio.Event()
        record = await asyncio.to_thread(self.store.add_if_room, job_id, job_type, params, options, self.queue_size)
        if record is None:
            self._finished_events.pop(job_id, None)
            if self.metrics:
                self.metrics.rejected.labels("QUEUE_IS_FULL").inc()
            return None
        if self.metrics:
            self.metrics.submitted.labels(job_type).inc()
        self._wakeup.set()
        return record

    async def get(self, job_id: str) -> JobView | None:
        live = self.live.get(job_id)
        record = await asyncio.to_thread(self.store.get, job_id)
        if record is None:
            return None
        if live is not None and not record.finished:
            return JobView(record, live.progress, live.status, live.preview)
        return JobView(record, record.progress, record.status, None)

    async def wait(self, job_id: str) -> JobRecord:
        """Block until the job ends (never forever: every job ends, and a job another replica runs
        is polled)."""
        event = self._finished_events.get(job_id)
        while True:
            if event is not None:
                try:
                    await asyncio.wait_for(event.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(0.5)
            record = await asyncio.to_thread(self.store.get, job_id)
            if record is None or record.finished:
                self._finished_events.pop(job_id, None)
                return record

    async def cancel(self, job_id: str | None = None) -> list[str]:
        """Cancel one job (waiting or running), or every running job when job_id is None."""
        ids = await asyncio.to_thread(self.store.request_cancel, job_id)
        for i in ids:
            live = self.live.get(i)
            if live is not None:
                live.cancel_requested = True
                if live.task is not None:
                    live.task.cancel()  # closes the gRPC stream: Triton cancels the request
            elif job_id is not None:  # a waiting job: the store ended it already
                self._notify_finished(i)
                if self.metrics:
                    self.metrics.finished.labels("USER_CANCEL").inc()
        return ids

    async def delete(self, job_id: str) -> bool:
        record = await asyncio.to_thread(self.store.get, job_id)
        if record is None:
            return False
        if not record.finished:
            await self.cancel(job_id)
            await self.wait(job_id)
        record = await asyncio.to_thread(self.store.delete, job_id)
        if record is not None:
            await asyncio.to_thread(self.files.delete_results, record.results)
        return record is not None

    # Workers

    async def _worker(self, index: int) -> None:
        while True:
            record = await asyncio.to_thread(self.store.claim_next, self.owner)
            if record is None:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                continue
            live = LiveJob(record, status="Waiting for Triton ...")
            self.live[record.job_id] = live
            if self.metrics:
                self.metrics.job_started(record.in_queue_mills, record.start_mills)
            live.task = asyncio.create_task(self._execute(live), name=f"job-{record.job_id}")
            try:
                await asyncio.wait({live.task})
            finally:
                self.live.pop(record.job_id, None)

    async def _heartbeat(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.heartbeat_s)
            beats += 1
            if beats % 15 == 0:  # jobs of a replica that vanished end as interrupted
                try:
                    await asyncio.to_thread(self.store.recover, "", int(self.stale_after_s * 1000))
                except Exception:
                    log.exception("stale-job recovery failed")
            try:
                cancelled = await asyncio.to_thread(self.store.heartbeat, list(self.live))
            except Exception:
                log.exception("heartbeat failed")
                continue
            for job_id in cancelled:  # stop requested through another replica
                live = self.live.get(job_id)
                if live is not None and not live.cancel_requested:
                    live.cancel_requested = True
                    if live.task is not None:
                        live.task.cancel()

    async def _execute(self, live: LiveJob) -> None:
        record = live.record
        try:
            await self.client.wait_ready(self.ready_timeout_s)
            async for event in self.client.run(record.params, record.job_id):
                await self._on_event(live, event.data, event.image)
            await self._end(live, SUCCESS, "SUCCESS", "Finished", progress=100)
        except asyncio.CancelledError:
            if live.cancel_requested:
                await asyncio.shield(self._end(live, ERROR, "USER_CANCEL", "Cancelled"))
            else:  # shutdown; after a hard kill, recover() at the next start does the same
                await asyncio.shield(self._end(
                    live, ERROR, "ERROR", "Interrupted: the frontend stopped before the job finished"))
                raise
        except TritonJobError as exc:
            await self._end(live, ERROR, "ERROR", str(exc))
        except Exception as exc:  # never leave a job without an end
            log.exception("job %s failed", record.job_id)
            await self._end(live, ERROR, "ERROR", f"{type(exc).__name__}: {exc}")

    async def _on_event(self, live: LiveJob, data: dict, image) -> None:
        kind = data.get("type")
        if kind == "progress":
            live.progress = max(live.progress, min(99, int(data.get("progress", live.progress))))
            live.status = data.get("status", live.status)
            if data.get("preview"):
                live.preview = data["preview"]
            if "step" in data:
                now = time.monotonic()
                if self.metrics and live.last_step is not None and data["step"] > 1:
                    self.metrics.step_seconds.observe(now - live.last_step)
                live.last_step = now
        elif kind == "result" and image is not None:
            index = int(data["image_index"])
            live.status = f"Saving image {index + 1}/{int(live.record.params.get('image_number', 1))} to system ..."
            live.results.append(await asyncio.to_thread(self.result_hook, live.record, data, image))
            if self.metrics:
                self.metrics.images.inc()
        now = time.monotonic()
        if now - live.last_write >= PROGRESS_WRITE_INTERVAL_S:
            live.last_write = now
            await asyncio.to_thread(self.store.progress, live.record.job_id, live.progress, live.status)

    async def _end(self, live: LiveJob, stage: str, reason: str, status: str, progress: int | None = None) -> None:
        record = live.record
        results = live.results if stage == SUCCESS else []
        if stage != SUCCESS and live.results:  # a failed or cancelled job keeps no partial files
            await asyncio.to_thread(self.files.delete_results, live.results)
        await asyncio.to_thread(self.store.finish, record.job_id, stage, reason, status, results, progress)
        log.info("job %s: %s%s", record.job_id, reason, "" if stage == SUCCESS else f" ({status})")
        if self.metrics:
            self.metrics.job_finished(reason, record.start_mills)
        self._notify_finished(record.job_id)
        self._send_webhook(record, results)
        if self.queue_history:
            trimmed = await asyncio.to_thread(self.store.trim_history, self.queue_history)
            for old in trimmed:
                await asyncio.to_thread(self.files.delete_results, old.results)

    def _notify_finished(self, job_id: str) -> None:
        event = self._finished_events.get(job_id)
        if event is not None:
            event.set()

    def _send_webhook(self, record: JobRecord, results: list[dict]) -> None:
        if self.webhooks is None:
            return
        from .webhooks import webhook_payload

        per_request = record.options.get("webhook_url") or None
        url = per_request or self.global_webhook_url
        if url:
            self.webhooks.send(url, webhook_payload(record.job_id, results), trusted=per_request is None)
