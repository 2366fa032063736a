"""Prometheus metrics of the frontend (GET /metrics), beside Triton's own nv_* metrics.

| metric | type | labels |
|---|---|---|
| fooocus_jobs_submitted_total | counter | job_type |
| fooocus_jobs_rejected_total | counter | reason (QUEUE_IS_FULL) |
| fooocus_jobs_finished_total | counter | finish_reason (SUCCESS, ERROR, USER_CANCEL) |
| fooocus_jobs | gauge | stage (WAITING, RUNNING): the queue depth, read from the job store |
| fooocus_job_queue_seconds | histogram | — time from submission to start |
| fooocus_job_duration_seconds | histogram | finish_reason: time from start to end |
| fooocus_step_seconds | histogram | — time between two sampling steps of a job |
| fooocus_images_total | counter | — images written |
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JOB_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _QueueDepth:
    """Collected at scrape time from the store, so every replica reports the shared queue."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        family = GaugeMetricFamily("fooocus_jobs", "Jobs waiting or running, by stage", labels=["stage"])
        for stage, count in self.store.count_by_stage().items():
            family.add_metric([stage], count)
        yield family


class Metrics:
    def __init__(self, store):
        self.registry = CollectorRegistry()
        r = self.registry
        self.submitted = Counter("fooocus_jobs_submitted", "Jobs accepted", ["job_type"], registry=r)
        self.rejected = Counter("fooocus_jobs_rejected", "Jobs refused at admission", ["reason"], registry=r)
        self.finished = Counter("fooocus_jobs_finished", "Jobs ended", ["finish_reason"], registry=r)
        self.queue_seconds = Histogram("fooocus_job_queue_seconds", "Submission to start", buckets=JOB_BUCKETS,
                                       registry=r)
        self.duration = Histogram("fooocus_job_duration_seconds", "Start to end", ["finish_reason"],
                                  buckets=JOB_BUCKETS, registry=r)
        self.step_seconds = Histogram("fooocus_step_seconds", "Time between two sampling steps",
                                      buckets=STEP_BUCKETS, registry=r)
        self.images = Counter("fooocus_images", "Images written", registry=r)
        r.register(_QueueDepth(store))

    def job_started(self, in_queue_mills: int, start_mills: int) -> None:
        self.queue_seconds.observe(max(0, start_mills - in_queue_mills) / 1000)

    def job_finished(self, reason: str, start_mills: int) -> None:
        self.finished.labels(reason).inc()
        if start_mills:
            self.duration.labels(reason).observe(max(0.0, time.time() - start_mills / 1000))

    def render(self) -> bytes:
        return generate_latest(self.registry)
