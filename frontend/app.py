"""The FastAPI application."""
from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .api_router import files_router, router
from .files import OutputFiles
from .jobs import JobManager
from .triton_client import TritonPipelineClient


@dataclass
class Settings:
    triton_url: str
    base_url: str = "http://127.0.0.1:8888"
    output_dir: Path = Path("outputs/files")
    concurrency: int = 2
    triton_ready_timeout_s: float = 180.0


def create_app(settings: Settings) -> FastAPI:
    files = OutputFiles(settings.output_dir, settings.base_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        jobs = JobManager(TritonPipelineClient(settings.triton_url), files, settings.concurrency,
                          settings.triton_ready_timeout_s)
        app.state.jobs = jobs
        await jobs.start()
        try:
            yield
        finally:
            await jobs.stop()

    # strict_content_type=False: a JSON body sent with no Content-Type is parsed as JSON, as
    # Fooocus-API clients (and its own examples) rely on.
    app = FastAPI(lifespan=lifespan, strict_content_type=False)
    app.state.settings = settings
    app.state.files = files
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])
    app.include_router(router)
    app.include_router(files_router)
    return app
