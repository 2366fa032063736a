"""python -m frontend [options]: serve the Fooocus-API routes.

With --triton-url the frontend talks to a running Triton (production). Without it, it starts the
embedded Triton bundled in nvidia-pytriton on --model-repository (built by `python -m export
default`), supervises it, and stops it on exit. Unknown flags (Fooocus's own, e.g. --always-gpu)
are accepted with a warning."""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

import uvicorn

from pipeline.presets import PRESETS

from .app import Settings, create_app

log = logging.getLogger("frontend")
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m frontend", description=__doc__)
    g = p.add_argument_group("Fooocus-API")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8888)
    g.add_argument("--base-url", default=None, help="prefix of file URLs (default http://<host>:<port>)")
    g.add_argument("--log-level", default="info")
    g.add_argument("--queue-size", type=int, default=100, help="most jobs waiting or running at once")
    g.add_argument("--queue-history", type=int, default=0,
                   help="finished jobs kept (0 = all); older ones are deleted with their files")
    g.add_argument("--webhook-url", default=None, help="called for every finished job")
    g.add_argument("--persistent", action="store_true", help="job-history answers in the persistent shape")
    g.add_argument("--apikey", default=None, help="require this X-API-KEY header")
    g.add_argument("--preset", default="default", choices=sorted(PRESETS))
    g.add_argument("--disable-image-log", action="store_true",
                   help="accepted for compatibility: no image log is written anyway, results are returned")
    g.add_argument("--gpu-device-id", default=None, help="CUDA_VISIBLE_DEVICES for the embedded Triton")
    g = p.add_argument_group("this server")
    g.add_argument("--output-dir", type=Path, default=Path("outputs/files"))
    g.add_argument("--database-url", default=os.environ.get("FOOOCUS_DB_CONF"),
                   help="SQLAlchemy URL of the job store (env FOOOCUS_DB_CONF; default SQLite beside --output-dir)")
    g.add_argument("--concurrency", type=int, default=2, help="jobs running at once")
    g.add_argument("--instance-id", default=None,
                   help="stable name of this frontend replica (default host:port): RUNNING jobs of the same "
                        "instance end as interrupted when it restarts")
    g.add_argument("--allow-private-urls", action="store_true",
                   help="let image URLs and per-request webhooks reach loopback/private/link-local addresses")
    g.add_argument("--max-upload-mb", type=float, default=20.0)
    g.add_argument("--max-image-megapixels", type=float, default=40.0)
    g.add_argument("--checkpoints-dir", type=Path, default=ROOT / "models" / "checkpoints")
    g.add_argument("--loras-dir", type=Path, default=ROOT / "models" / "loras")
    g.add_argument("--triton-url", default=None, help="gRPC host:port of a running Triton")
    g.add_argument("--model-repository", type=Path, default=ROOT / "build" / "model_repository",
                   help="repository for the embedded Triton")
    g.add_argument("--triton-work-dir", type=Path, default=ROOT / "build" / "triton")
    g.add_argument("--triton-ports", default="18000,18001,18002", help="embedded Triton HTTP,gRPC,metrics ports")
    args, unknown = p.parse_known_args(argv)
    return args, unknown


def served_checkpoint(repo: Path) -> str | None:
    info = repo / "fooocus_pipeline" / "1" / "model_info.json"
    return json.loads(info.read_text()).get("checkpoint") if info.exists() else None


def main(argv=None) -> int:
    args, unknown = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if unknown:
        log.warning("ignoring unknown arguments: %s", " ".join(unknown))
    display_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base_url = args.base_url or f"http://{display_host}:{args.port}"
    launcher = None
    triton_url = args.triton_url
    if triton_url is None:
        from .triton_launcher import TritonLauncher

        if not (args.model_repository / "fooocus_pipeline" / "config.pbtxt").exists():
            log.error("no model repository at %s; build it with `python -m export default`", args.model_repository)
            return 2
        if args.gpu_device_id is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu_device_id)
        # The embedded Triton's pipeline resolves LoRA names in the folder this frontend lists.
        os.environ["FOOOCUS_LORAS_DIR"] = str(Path(args.loras_dir).resolve())
        http, grpc, metrics = (int(x) for x in args.triton_ports.split(","))
        launcher = TritonLauncher(args.model_repository, args.triton_work_dir, http_port=http, grpc_port=grpc,
                                  metrics_port=metrics)
        log.info("starting the embedded Triton Inference Server ...")
        launcher.start()
        triton_url = launcher.grpc_url
    args.output_dir.mkdir(parents=True, exist_ok=True)  # the default SQLite store sits beside it
    try:
        settings = Settings(
            triton_url=triton_url, base_url=base_url, output_dir=args.output_dir, database_url=args.database_url,
            concurrency=args.concurrency, queue_size=args.queue_size, queue_history=args.queue_history,
            webhook_url=args.webhook_url, persistent=args.persistent, apikey=args.apikey, preset=args.preset,
            instance_id=args.instance_id or f"{socket.gethostname()}:{args.port}",
            allow_private_urls=args.allow_private_urls, max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_image_pixels=int(args.max_image_megapixels * 1e6), checkpoints_dir=args.checkpoints_dir,
            loras_dir=args.loras_dir,
            served_checkpoint=served_checkpoint(args.model_repository) if launcher else None)
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        if launcher is not None:
            launcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
