"""The FastAPI application: routes, middleware, error shapes and the job system's lifecycle."""
from __future__ import annotations

import logging
import math
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, Response

from pipeline.presets import PRESETS

from .api_router import files_router, router
from .files import OutputFiles
from .images import ImageLimits
from .jobs import JobManager
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .serving import ImageTooLarge, field_loc, save_result
from .store import JobStore
from .triton_client import TritonPipelineClient

log = logging.getLogger(__name__)


@dataclass
class Settings:
    triton_url: str
    base_url: str = "http://127.0.0.1:8888"
    output_dir: Path = Path("outputs/files")
    database_url: str | None = None  # default: sqlite:///<output_dir>/../jobs.db
    concurrency: int = 2
    queue_size: int = 100
    queue_history: int = 0
    webhook_url: str | None = None
    persistent: bool = False
    apikey: str | None = None
    preset: str = "default"
    instance_id: str | None = None
    allow_private_urls: bool = False
    max_upload_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    checkpoints_dir: Path | None = None
    loras_dir: Path | None = None
    served_checkpoint: str | None = None
    triton_ready_timeout_s: float = 180.0


def default_database_url(output_dir: Path) -> str:
    return f"sqlite:///{(Path(output_dir).resolve().parent / 'jobs.db')}"


def create_app(settings: Settings) -> FastAPI:
    if settings.preset not in PRESETS:
        raise ValueError(f"unknown preset {settings.preset!r}; choose from {', '.join(PRESETS)}")
    files = OutputFiles(settings.output_dir, settings.base_url)
    store = JobStore(settings.database_url or default_database_url(settings.output_dir))
    metrics = Metrics(store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from .webhooks import WebhookSender

        webhooks = WebhookSender(allow_private=settings.allow_private_urls)
        await webhooks.start()
        jobs = JobManager(
            store, TritonPipelineClient(settings.triton_url), files, webhooks=webhooks,
            global_webhook_url=settings.webhook_url, concurrency=settings.concurrency,
            queue_size=settings.queue_size, queue_history=settings.queue_history,
            owner=settings.instance_id or f"{socket.gethostname()}:{settings.base_url}",
            ready_timeout_s=settings.triton_ready_timeout_s,
            result_hook=lambda record, data, image: save_result(files, record, data, image), metrics=metrics)
        app.state.jobs = jobs
        await jobs.start()
        try:
            yield
        finally:
            await jobs.stop()
            store.close()

    # strict_content_type=False: a JSON body sent with no Content-Type is parsed as JSON, as
    # Fooocus-API clients (and its own examples) rely on.
    app = FastAPI(lifespan=lifespan, strict_content_type=False)
    app.state.settings = settings
    app.state.files = files
    app.state.image_limits = ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels,
                                         allow_private_urls=settings.allow_private_urls)
    app.state.apply_preset = lambda params, req: apply_preset(settings.preset, params, req)
    app.add_middleware(GZipMiddleware, minimum_size=1000)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])
    app.include_router(router)
    app.include_router(files_router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():  # open like /files: scrapers carry no API key
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": jsonable_encoder(_clean(exc.errors()))}, status_code=422)

    @app.exception_handler(ImageTooLarge)
    async def too_large(request: Request, exc: ImageTooLarge):
        return JSONResponse({"detail": [{"type": "too_large", "loc": list(field_loc(exc.error.field)),
                                         "msg": str(exc.error), "input": None}]}, status_code=413)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # JSON, never a text/plain 500
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "Internal Server Error"}, status_code=500)

    return app


def _clean(errors) -> list[dict]:
    """Pydantic error dicts, made JSON-safe (ctx may hold exception objects; inputs may be bytes)."""
    out = []
    for e in errors:
        e = dict(e)
        if "ctx" in e:
            e["ctx"] = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v))
                        for k, v in e["ctx"].items()}
        e["input"] = _json_safe(e.get("input"))
        e.pop("url", None)
        out.append(e)
    return out


def _json_safe(value):
    """An error's echoed input as strict JSON: bytes decoded, NaN/Infinity (which Python's JSON
    parser accepts) as strings, else the 422 body itself could not be rendered."""
    if isinstance(value, (bytes, bytearray)):
        return value.decode(errors="replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def apply_preset(preset: str, params: dict, req) -> None:
    """--preset: the preset's defaults replace the default preset's for fields the client did not send."""
    for field, value in PRESETS[preset].items():
        if field in params and field not in req.model_fields_set:
            params[field] = value
