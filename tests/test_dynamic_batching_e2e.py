"""Concurrent jobs share leaf calls through Triton's dynamic batcher, and sharing changes no pixel.

Four text-to-image jobs (same size, different seeds) run at once through the frontend and the
session's Triton (python-ort leaves, one instance each, `max_batch_size` from
`pipeline.interfaces.LEAF_MAX_BATCH`). Triton's statistics for the `unet` leaf count requests
(`inference_stats.success.count`), samples (`inference_count`) and model executions
(`execution_count`): executions fewer than requests means calls of different jobs ran as one batch.
Each image equals, bit for bit, the image the same request gives alone: ONNX Runtime's CPU kernels
compute every sample of a batch the same way whatever else is in the batch (tests/test_batching.py
checks the UNet directly).
"""
from __future__ import annotations

import io

import httpx
import numpy as np
from PIL import Image

from .conftest import served_frontend

STEPS = 6


def job(seed: int, **extra) -> dict:
    return {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "aspect_ratios_selection": "128*128",
            "image_seed": seed, "style_selections": [], "guidance_scale": 5.0,
            "advanced_params": {"overwrite_step": STEPS, "sampler_name": "euler", "disable_preview": True}, **extra}


def unet_stats(triton) -> dict:
    body = httpx.get(f"{triton.http_url}/v2/models/unet/stats", timeout=10).json()
    (stats,) = body["model_stats"]
    return {"requests": int(stats["inference_stats"]["success"]["count"]),
            "samples": int(stats["inference_count"]), "executions": int(stats["execution_count"])}


def png(frontend, url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(frontend.client.get(url[len(frontend.base_url):]).content)).convert("RGB"))


def test_concurrent_jobs_share_unet_calls_and_give_the_images_they_give_alone(triton, tmp_path):
    seeds = (601, 602, 603, 604)
    with served_frontend(triton.grpc_url, tmp_path / "outputs", concurrency=len(seeds)) as frontend:
        alone = []
        for seed in seeds:
            (result,) = frontend.client.post("/v1/generation/text-to-image", json=job(seed)).json()
            assert result["finish_reason"] == "SUCCESS", result
            alone.append(png(frontend, result["url"]))
        before = unet_stats(triton)
        ids = [frontend.client.post("/v1/generation/text-to-image", json=job(seed, async_process=True)).json()["job_id"]
               for seed in seeds]
        finished = [frontend.wait_job(job_id, timeout=120) for job_id in ids]
        after = unet_stats(triton)
        together = []
        for body in finished:
            assert body["job_stage"] == "SUCCESS", body
            (result,) = body["job_result"]
            together.append(png(frontend, result["url"]))
    delta = {k: after[k] - before[k] for k in after}
    # one request per step and job, each a CFG pair; fewer executions: jobs shared calls
    assert delta["requests"] == len(seeds) * STEPS and delta["samples"] == 2 * delta["requests"], delta
    assert delta["executions"] < delta["requests"], delta
    for seed, a, b in zip(seeds, alone, together):
        assert a.shape == b.shape == (128, 128, 3)
        assert np.array_equal(a, b), (seed, int(np.abs(a.astype(int) - b.astype(int)).max()))
