"""Shared fixtures: the embedded default model repository (built once, cached in build/), one
Triton server per test session, and the frontend served by uvicorn on a free loopback port."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
# The workspace's shared fixtures sit beside the checkout (CI clones the project next to shared/).
FIXTURE_IMAGES = next((p for p in (ROOT.parent / "shared" / "fixtures" / "images",
                                   Path("/work/shared/fixtures/images")) if p.is_dir()),
                      ROOT.parent / "shared" / "fixtures" / "images")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_repository() -> Path:
    from export.__main__ import build_default

    return build_default()


@pytest.fixture(scope="session")
def onnx_dir(model_repository) -> Path:
    info = json.loads((model_repository / "fooocus_pipeline" / "1" / "model_info.json").read_text())
    dirs = sorted((ROOT / "build" / "onnx").glob("tiny-sdxl-*"))
    assert dirs and info["dims"], "build_default() writes build/onnx/tiny-sdxl-<digest>"
    return dirs[-1]


@pytest.fixture(scope="session")
def tiny_checkpoint(onnx_dir) -> Path:
    return ROOT / "build" / "checkpoints" / onnx_dir.name


def start_triton(model_repository: Path, work_dir: Path, restart: bool = True):
    from frontend.triton_launcher import TritonLauncher

    return TritonLauncher(model_repository, work_dir, http_port=free_port(), grpc_port=free_port(),
                          metrics_port=free_port(), restart=restart).start()


@pytest.fixture(scope="session", autouse=True)
def loras_dir(tmp_path_factory) -> Path:
    """This test session's LoRA folder (empty at first): the served pipeline and in-process
    pipelines resolve LoRA names here (FOOOCUS_LORAS_DIR, which the Triton server inherits), never
    in the checkout's models/loras. Tests add files under names of their own and remove the ones
    that would change other tests (e.g. a performance LoRA)."""
    LORAS_DIR_ENV = "FOOOCUS_LORAS_DIR"  # pipeline.lora.LORAS_DIR_ENV (not imported: it imports torch)
    folder = tmp_path_factory.mktemp("loras")
    previous = os.environ.get(LORAS_DIR_ENV)
    os.environ[LORAS_DIR_ENV] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(LORAS_DIR_ENV, None)
    else:
        os.environ[LORAS_DIR_ENV] = previous


@pytest.fixture(scope="session")
def triton(model_repository, loras_dir, tmp_path_factory):
    launcher = start_triton(model_repository, tmp_path_factory.mktemp("triton"))
    yield launcher
    launcher.stop()


class ServedFrontend:
    """The frontend app under a real uvicorn server in a background thread."""

    def __init__(self, triton_url: str, output_dir: Path, **settings):
        import uvicorn

        from frontend.app import Settings, create_app

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        settings.setdefault("database_url", f"sqlite:///{output_dir / 'jobs.db'}")
        settings.setdefault("triton_ready_timeout_s", 120)
        self.settings = Settings(triton_url=triton_url, base_url=self.base_url, output_dir=output_dir, **settings)
        self.app = create_app(self.settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServedFrontend":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("frontend did not start")
            time.sleep(0.05)
        self.client = httpx.Client(base_url=self.base_url, timeout=300)
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def wait_job(self, job_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.client.get("/v1/generation/query-job", params={"job_id": job_id}).json()
            if body["job_stage"] in ("SUCCESS", "ERROR"):
                return body
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} did not finish")


@pytest.fixture(scope="session")
def served(triton, tmp_path_factory):
    with ServedFrontend(triton.grpc_url, tmp_path_factory.mktemp("outputs")) as frontend:
        yield frontend


@contextlib.contextmanager
def served_frontend(triton_url: str, output_dir: Path, **settings):
    """Another frontend (its own job database and output folder) on the session's Triton."""
    with ServedFrontend(triton_url, output_dir, **settings) as frontend:
        yield frontend


@pytest.fixture(scope="session")
def postgres_url():
    """A database on a private PostgreSQL server on 127.0.0.1 (tests/postgres.py installs Debian's
    package when missing); fails under CI, skips elsewhere, when it cannot run."""
    from tests.postgres import postgres_session

    yield from postgres_session()
