"""Text to image end to end: HTTP -> frontend -> Triton (BLS + ONNX leaf models) -> PNG."""
from __future__ import annotations

import io
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image

SMALL = {"aspect_ratios_selection": "256*192", "advanced_params": {"overwrite_step": 6}}


def fetch_png(served, url: str) -> bytes:
    assert url.startswith(served.base_url + "/files/")
    r = served.client.get(url[len(served.base_url):])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    return r.content


def generate(served, **fields) -> list[dict]:
    r = served.client.post("/v1/generation/text-to-image", json={"prompt": "a cat", **SMALL, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_sync_request_returns_png_of_requested_size(served):
    results = generate(served, image_seed=7)
    assert len(results) == 1
    result = results[0]
    assert list(result) == ["base64", "url", "seed", "finish_reason"]
    assert result["finish_reason"] == "SUCCESS" and result["seed"] == "7" and result["base64"] is None
    assert re.fullmatch(served.base_url + r"/files/\d{4}-\d{2}-\d{2}/[0-9a-f-]{36}-0\.png", result["url"])
    image = Image.open(io.BytesIO(fetch_png(served, result["url"])))
    assert image.size == (256, 192) and image.mode == "RGB"


def test_async_request_reports_progress_and_result(served):
    r = served.client.post("/v1/generation/text-to-image", json={
        "prompt": "a cat", "aspect_ratios_selection": "384*384", "async_process": True,
        "image_seed": 11, "advanced_params": {"overwrite_step": 40}})
    body = r.json()
    assert list(body) == ["job_id", "job_type", "job_stage", "job_progress", "job_status", "job_step_preview",
                          "job_result"]
    assert body["job_type"] == "Text to Image" and body["job_stage"] in ("WAITING", "RUNNING")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", body["job_id"])
    seen_steps = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = served.client.get("/v1/generation/query-job", params={"job_id": body["job_id"]}).json()
        if job["job_stage"] == "RUNNING" and job["job_status"]:
            m = re.fullmatch(r"Step (\d+)/40 in the 1-th Sampling", job["job_status"])
            if m:
                seen_steps.add(int(m.group(1)))
                assert 15 <= job["job_progress"] < 100
        if job["job_stage"] in ("SUCCESS", "ERROR"):
            break
        time.sleep(0.02)
    assert job["job_stage"] == "SUCCESS", job
    assert job["job_progress"] == 100 and job["job_status"] == "Finished"
    assert seen_steps, "progress was never reported while running"
    (result,) = job["job_result"]
    assert result["seed"] == "11"
    assert Image.open(io.BytesIO(fetch_png(served, result["url"]))).size == (384, 384)


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(served):
    a = fetch_png(served, generate(served, image_seed=1234)[0]["url"])
    b = fetch_png(served, generate(served, image_seed=1234)[0]["url"])
    c = fetch_png(served, generate(served, image_seed=1235)[0]["url"])
    assert a == b
    assert np.abs(np.asarray(Image.open(io.BytesIO(a)), dtype=int)
                  - np.asarray(Image.open(io.BytesIO(c)), dtype=int)).max() > 10


def test_image_number_two_uses_seed_and_seed_plus_one(served):
    results = generate(served, image_seed=500, image_number=2)
    assert [r["seed"] for r in results] == ["500", "501"]
    first = fetch_png(served, results[0]["url"])
    second = fetch_png(served, results[1]["url"])
    single = fetch_png(served, generate(served, image_seed=501)[0]["url"])
    assert second == single and first != second


def test_random_seed_is_reported_as_a_string(served):
    (result,) = generate(served, image_seed=-1)
    assert result["seed"].isdigit() and 0 <= int(result["seed"]) < 2**63


def test_defaults_give_1152x896_with_30_steps(served):
    r = served.client.post("/v1/generation/text-to-image", json={"prompt": "a cat", "async_process": True})
    job_id = r.json()["job_id"]
    statuses = set()
    while True:
        job = served.client.get("/v1/generation/query-job", params={"job_id": job_id}).json()
        statuses.add(job["job_status"])
        if job["job_stage"] in ("SUCCESS", "ERROR"):
            break
        time.sleep(0.05)
    assert job["job_stage"] == "SUCCESS", job
    assert any(s and s.endswith("/30 in the 1-th Sampling") for s in statuses)
    image = Image.open(io.BytesIO(fetch_png(served, job["job_result"][0]["url"])))
    assert image.size == (1152, 896)


def test_unsupported_feature_ends_the_job_with_a_readable_error(served):
    results = generate(served, performance_selection="Lightning", image_seed=3)
    assert results == [{"base64": None, "url": None, "seed": "3", "finish_reason": "ERROR"}]
    r = served.client.post("/v1/generation/text-to-image", json={
        "prompt": "a cat", "performance_selection": "Lightning", "async_process": True})
    job = served.wait_job(r.json()["job_id"])
    assert job["job_stage"] == "ERROR" and "LoRA" in job["job_status"] and job["job_result"] is None


def unet_inference_count(triton) -> int:
    text = httpx.get(f"http://127.0.0.1:{triton.metrics_port}/metrics").text
    m = re.search(r'nv_inference_count\{model="unet",version="1"\} (\d+)', text)
    return int(m.group(1)) if m else 0


def test_stop_cancels_the_triton_request(served, triton):
    r = served.client.post("/v1/generation/text-to-image", json={
        "prompt": "a cat", "aspect_ratios_selection": "512*512", "async_process": True,
        "advanced_params": {"overwrite_step": 200}})
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = served.client.get("/v1/generation/query-job", params={"job_id": job_id}).json()
        if job["job_status"] and job["job_status"].startswith("Step 3/"):
            break
        time.sleep(0.02)
    assert served.client.post("/v1/generation/stop").json() == {"msg": "success"}
    job = served.wait_job(job_id, timeout=30)
    assert job["job_stage"] == "ERROR" and job["job_result"] is None
    # Triton stopped the pipeline: the UNet call count settles far below 200 steps.
    time.sleep(1.0)
    before = unet_inference_count(triton)
    time.sleep(1.5)
    assert unet_inference_count(triton) == before


@pytest.mark.parametrize("path", ["/files/2024-01-01/missing.png", "/files/..%2F..%2Fetc/passwd.png",
                                  "/files/2024-01-01/x.txt"])
def test_files_route_answers_404_for_missing_or_unsafe_names(served, path):
    assert served.client.get(path).status_code == 404


def test_ping_and_job_queue(served):
    assert served.client.get("/ping").json() == "pong"
    queue = served.client.get("/v1/generation/job-queue").json()
    assert set(queue) == {"running_size", "finished_size", "last_job_id"}
    assert queue["finished_size"] >= 0


SAMPLER_NAMES_SERVED = [s for s in __import__("pipeline.presets", fromlist=["x"]).SAMPLER_NAMES]
SCHEDULER_NAMES_SERVED = [s for s in __import__("pipeline.presets", fromlist=["x"]).SCHEDULER_NAMES
                          if s != "edm_playground_v2.5"]


@pytest.mark.parametrize("sampler", SAMPLER_NAMES_SERVED)
def test_every_sampler_runs_end_to_end(served, sampler):
    (result,) = generate(served, image_seed=5, aspect_ratios_selection="128*128",
                         advanced_params={"overwrite_step": 4, "sampler_name": sampler})
    assert result["finish_reason"] == "SUCCESS", sampler
    assert Image.open(io.BytesIO(fetch_png(served, result["url"]))).size == (128, 128)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES_SERVED)
def test_every_scheduler_runs_end_to_end(served, scheduler):
    r = served.client.post("/v1/generation/text-to-image", json={
        "prompt": "a cat", "aspect_ratios_selection": "128*128", "image_seed": 5, "async_process": True,
        "advanced_params": {"overwrite_step": 4, "scheduler_name": scheduler, "sampler_name": "euler"}})
    job = served.wait_job(r.json()["job_id"])
    assert job["job_stage"] == "SUCCESS", (scheduler, job["job_status"])


def test_playground_scheduler_needs_a_playground_checkpoint(served):
    r = served.client.post("/v1/generation/text-to-image", json={
        "prompt": "a cat", "aspect_ratios_selection": "128*128", "async_process": True,
        "advanced_params": {"scheduler_name": "edm_playground_v2.5"}})
    job = served.wait_job(r.json()["job_id"])
    assert job["job_stage"] == "ERROR" and "Playground" in job["job_status"]


@pytest.mark.parametrize("disable_preview", [False, True])
def test_step_preview_while_running(served, disable_preview):
    import base64

    r = served.client.post("/v1/generation/text-to-image", json={
        "prompt": "a cat", "aspect_ratios_selection": "512*384", "async_process": True,
        "advanced_params": {"overwrite_step": 60, "disable_preview": disable_preview}})
    job_id = r.json()["job_id"]
    preview = None
    while True:
        job = served.client.get("/v1/generation/query-job",
                                params={"job_id": job_id, "require_step_preview": True}).json()
        if job["job_stage"] == "RUNNING" and (job["job_status"] or "").startswith("Step"):
            preview = job["job_step_preview"]
            if preview or disable_preview:
                break
        assert job["job_stage"] != "ERROR", job
        time.sleep(0.05)
    served.client.post("/v1/generation/stop", json={"job_id": job_id})
    if disable_preview:
        assert preview is None
    else:
        image = Image.open(io.BytesIO(base64.b64decode(preview)))  # raw base64 PNG, no data: prefix
        assert image.format == "PNG" and image.size == (128, 96)
    no_preview = served.client.get("/v1/generation/query-job", params={"job_id": job_id}).json()
    assert no_preview["job_step_preview"] is None
