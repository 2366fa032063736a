"""GET /metrics: the frontend's Prometheus metrics after a few real jobs."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from .conftest import served_frontend


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_after_jobs(triton, tmp_path):
    with served_frontend(triton.grpc_url, tmp_path, queue_size=2, apikey="k") as served:
        headers = {"X-API-KEY": "k"}
        body = {"prompt": "a cat", "aspect_ratios_selection": "256*256", "advanced_params": {"overwrite_step": 5}}
        for seed in (1, 2):
            (r,) = served.client.post("/v1/generation/text-to-image", json={**body, "image_seed": seed},
                                      headers=headers).json()
            assert r["finish_reason"] == "SUCCESS"
        failed = served.client.post("/v1/generation/text-to-image", headers=headers,
                                    json={**body, "performance_selection": "Lightning"}).json()
        assert failed[0]["finish_reason"] == "ERROR"
        response = served.client.get("/metrics")  # open without the API key, like /files
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    m = samples(response.text)
    assert m[("fooocus_jobs_submitted_total", (("job_type", "Text to Image"),))] == 3
    assert m[("fooocus_jobs_finished_total", (("finish_reason", "SUCCESS"),))] == 2
    assert m[("fooocus_jobs_finished_total", (("finish_reason", "ERROR"),))] == 1
    assert m[("fooocus_images_total", ())] == 2
    assert m[("fooocus_jobs", (("stage", "WAITING"),))] == 0 and m[("fooocus_jobs", (("stage", "RUNNING"),))] == 0
    assert m[("fooocus_job_duration_seconds_count", (("finish_reason", "SUCCESS"),))] == 2
    assert m[("fooocus_job_queue_seconds_count", ())] == 3
    # 5 steps per job: 4 intervals between steps each, for the two jobs that sampled
    assert m[("fooocus_step_seconds_count", ())] == 8
    assert m[("fooocus_step_seconds_sum", ())] > 0
