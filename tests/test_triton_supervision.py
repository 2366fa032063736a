"""Triton dies while a job runs: that job ends as ERROR with a reason, the launcher brings Triton
back by itself, and jobs submitted afterwards (even while it is still restarting) succeed."""
from __future__ import annotations

import os
import signal
import time

from .conftest import served_frontend, start_triton


def test_killed_triton_fails_the_running_job_and_comes_back(model_repository, tmp_path):
    launcher = start_triton(model_repository, tmp_path / "triton")
    try:
        with served_frontend(launcher.grpc_url, tmp_path / "outputs") as served:
            r = served.client.post("/v1/generation/text-to-image", json={
                "prompt": "a cat", "aspect_ratios_selection": "512*512", "async_process": True,
                "advanced_params": {"overwrite_step": 200}})
            running = r.json()["job_id"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                job = served.client.get("/v1/generation/query-job", params={"job_id": running}).json()
                if (job["job_status"] or "").startswith("Step 2/"):
                    break
                time.sleep(0.02)
            old_pid = launcher.pid
            os.kill(old_pid, signal.SIGKILL)

            job = served.wait_job(running, timeout=60)
            assert job["job_stage"] == "ERROR" and job["job_result"] is None
            assert "Triton" in job["job_status"], job["job_status"]

            # Submitted while Triton restarts: waits for readiness, then runs.
            r = served.client.post("/v1/generation/text-to-image", json={
                "prompt": "a cat", "aspect_ratios_selection": "256*256", "async_process": True,
                "image_seed": 5, "advanced_params": {"overwrite_step": 4}})
            after = served.wait_job(r.json()["job_id"], timeout=240)
            assert after["job_stage"] == "SUCCESS", after
            assert launcher.pid != old_pid and launcher.restarts == 1 and launcher.is_ready()

            (result,) = served.client.post("/v1/generation/text-to-image", json={
                "prompt": "a cat", "aspect_ratios_selection": "256*256", "image_seed": 6,
                "advanced_params": {"overwrite_step": 4}}).json()
            assert result["finish_reason"] == "SUCCESS" and result["seed"] == "6"
    finally:
        launcher.stop()
