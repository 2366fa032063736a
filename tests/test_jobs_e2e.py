"""The job system under stress, through the real server and Triton: a frontend killed mid-way
loses no job and runs none twice; admission never lets more than --queue-size jobs in; every
finished job calls its webhook exactly once."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from .conftest import ROOT, free_port, served_frontend


def small_job(seed: int, steps: int = 4, size: str = "256*256", **extra) -> dict:
    return {"prompt": "a cat", "aspect_ratios_selection": size, "image_seed": seed, "async_process": True,
            "advanced_params": {"overwrite_step": steps}, **extra}


class FrontendProcess:
    """`python -m frontend` in a subprocess against the session's Triton, so it can be killed."""

    def __init__(self, triton_url: str, workdir, port: int):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.args = [sys.executable, "-m", "frontend", "--triton-url", triton_url, "--port", str(port),
                     "--output-dir", str(workdir / "files"), "--database-url", f"sqlite:///{workdir / 'jobs.db'}",
                     "--concurrency", "2", "--log-level", "warning"]
        self.log = open(workdir / "frontend.log", "ab")
        self.proc = None

    def start(self) -> "FrontendProcess":
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/ping", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError("frontend did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def query(base_url: str, job_id: str) -> dict:
    r = httpx.get(f"{base_url}/v1/generation/query-job", params={"job_id": job_id}, timeout=10)
    assert r.status_code == 200, (job_id, r.status_code, r.text)
    return r.json()


def test_killed_frontend_loses_no_job_and_runs_none_twice(triton, tmp_path):
    port = free_port()
    frontend = FrontendProcess(triton.grpc_url, tmp_path, port).start()
    try:
        ids = [httpx.post(f"{frontend.base_url}/v1/generation/text-to-image", json=small_job(100 + i, steps=20),
                          timeout=10).json()["job_id"] for i in range(10)]
        assert all(ids) and len(set(ids)) == 10
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill once some are done and others still wait
            stages = [query(frontend.base_url, i)["job_stage"] for i in ids]
            if stages.count("SUCCESS") >= 2 and "WAITING" in stages:
                break
            time.sleep(0.05)
        before = {i: query(frontend.base_url, i) for i in ids}
        frontend.kill()

        frontend = FrontendProcess(triton.grpc_url, tmp_path, port).start()
        after = {}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            after = {i: query(frontend.base_url, i) for i in ids}
            if all(j["job_stage"] in ("SUCCESS", "ERROR") for j in after.values()):
                break
            time.sleep(0.2)
        assert all(j["job_stage"] in ("SUCCESS", "ERROR") for j in after.values()), after
        history = httpx.get(f"{frontend.base_url}/v1/generation/job-history", params={"page_size": 100}).json()
        timings = {h["job_id"]: h for h in history["history"]}
        assert set(timings) == set(ids) and history["queue"] == []
        for job_id in ids:
            old, new = before[job_id], after[job_id]
            if old["job_stage"] == "SUCCESS":  # finished before the kill: untouched, not re-run
                assert new == old
            elif old["job_stage"] == "RUNNING":  # interrupted: ends as ERROR with a reason, not re-run
                assert new["job_stage"] == "ERROR" and "Interrupted" in new["job_status"]
            else:  # waiting at the kill: runs once after the restart
                assert new["job_stage"] == "SUCCESS", new
                assert timings[job_id]["start_mills"] > max(t["finish_mills"] for i, t in timings.items()
                                                            if before[i]["job_stage"] == "SUCCESS")
            if new["job_stage"] == "SUCCESS":
                (result,) = new["job_result"]
                assert httpx.get(result["url"]).status_code == 200
            else:
                assert new["job_status"]
        assert sum(before[i]["job_stage"] == "WAITING" for i in ids) >= 1
    finally:
        frontend.stop()


def test_admission_never_exceeds_queue_size_and_every_accepted_job_finishes(triton, tmp_path):
    queue_size = 3
    with served_frontend(triton.grpc_url, tmp_path, queue_size=queue_size, concurrency=2) as served:
        accepted, full, max_running = [], 0, 0
        stop_watch = threading.Event()

        def watch():
            nonlocal max_running
            while not stop_watch.is_set():
                running = served.client.get("/v1/generation/job-queue").json()["running_size"]
                max_running = max(max_running, running)
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            def submit(i):
                return served.client.post("/v1/generation/text-to-image",
                                          json=small_job(i, steps=12, size="384*384")).json()

            with ThreadPoolExecutor(8) as pool:
                first_wave = list(pool.map(submit, range(3 * queue_size)))
            for body in first_wave:
                if body["job_id"]:
                    accepted.append(body["job_id"])
                else:
                    full += 1
                    assert body["job_stage"] == "ERROR" and body["job_result"] == [
                        {"base64": None, "url": None, "seed": "", "finish_reason": "QUEUE_IS_FULL"}]
            assert len(accepted) == queue_size and full == 2 * queue_size
            # Keep knocking while they run: a slot frees only when a job ends.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(accepted) < 3 * queue_size:
                body = submit(len(accepted) + 1000)
                if body["job_id"]:
                    accepted.append(body["job_id"])
                time.sleep(0.05)
            results = [served.wait_job(job_id, timeout=240) for job_id in accepted]
        finally:
            stop_watch.set()
            watcher.join()
        assert max_running <= queue_size
        assert len(accepted) == 3 * queue_size
        assert all(r["job_stage"] == "SUCCESS" for r in results), [r["job_status"] for r in results]


class Receiver:
    """A webhook receiver on loopback that records every POST."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                calls.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_one_webhook_call_per_finished_job(triton, tmp_path, receiver):
    with served_frontend(triton.grpc_url, tmp_path, webhook_url=f"{receiver.url}/global",
                         allow_private_urls=True) as served:
        ok = served.client.post("/v1/generation/text-to-image", json=small_job(7, image_number=2)).json()["job_id"]
        failed = served.client.post("/v1/generation/text-to-image",
                                    json=small_job(8, performance_selection="Lightning")).json()["job_id"]
        own = served.client.post("/v1/generation/text-to-image",
                                 json=small_job(9, webhook_url=f"{receiver.url}/own")).json()["job_id"]
        sync = served.client.post("/v1/generation/text-to-image",
                                  json={**small_job(10), "async_process": False}).json()
        jobs = {j: served.wait_job(j) for j in (ok, failed, own)}
        deadline = time.monotonic() + 30
        while len(receiver.calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # nothing more may arrive
    by_job = {}
    for path, body in receiver.calls:
        by_job.setdefault(body["job_id"], []).append((path, body))
    assert len(receiver.calls) == 4 and len(by_job) == 4
    (path, body), = by_job[ok]
    assert path == "/global" and body == {"job_id": ok, "job_result": [
        {"url": r["url"], "seed": r["seed"]} for r in jobs[ok]["job_result"]]}
    assert [r["seed"] for r in body["job_result"]] == ["7", "8"]
    assert by_job[failed] == [("/global", {"job_id": failed, "job_result": []})]
    (path, body), = by_job[own]
    assert path == "/own" and body["job_result"][0]["seed"] == "9"
    sync_calls = [b for jid, calls in by_job.items() if jid not in jobs for _, b in calls]
    assert sync_calls == [{"job_id": sync_calls[0]["job_id"],
                           "job_result": [{"url": sync[0]["url"], "seed": "10"}]}]


def test_per_request_webhook_to_loopback_is_refused_by_default(triton, tmp_path, receiver):
    with served_frontend(triton.grpc_url, tmp_path) as served:
        job = served.client.post("/v1/generation/text-to-image",
                                 json=small_job(11, webhook_url=f"{receiver.url}/own")).json()["job_id"]
        assert served.wait_job(job)["job_stage"] == "SUCCESS"
        time.sleep(1.0)
    assert receiver.calls == []
