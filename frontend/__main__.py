"""python -m frontend [options]: serve the Fooocus-API routes.

With --triton-url the frontend talks to a running Triton (production). Without it, it starts the
embedded Triton bundled in nvidia-pytriton on --model-repository (built by `python -m export
default`), supervises it, and stops it on exit."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from .app import Settings, create_app

log = logging.getLogger("frontend")
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m frontend", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8888)
    p.add_argument("--base-url", default=None, help="prefix of file URLs (default http://<host>:<port>)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/files"))
    p.add_argument("--concurrency", type=int, default=2, help="jobs running at once")
    p.add_argument("--triton-url", default=None, help="gRPC host:port of a running Triton")
    p.add_argument("--model-repository", type=Path, default=ROOT / "build" / "model_repository",
                   help="repository for the embedded Triton")
    p.add_argument("--triton-work-dir", type=Path, default=ROOT / "build" / "triton")
    p.add_argument("--triton-ports", default="18000,18001,18002", help="embedded Triton HTTP,gRPC,metrics ports")
    args, unknown = p.parse_known_args(argv)
    return args, unknown


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
        http, grpc, metrics = (int(x) for x in args.triton_ports.split(","))
        launcher = TritonLauncher(args.model_repository, args.triton_work_dir, http_port=http, grpc_port=grpc,
                                  metrics_port=metrics)
        log.info("starting the embedded Triton Inference Server ...")
        launcher.start()
        triton_url = launcher.grpc_url
    try:
        app = create_app(Settings(triton_url=triton_url, base_url=base_url, output_dir=args.output_dir,
                                  concurrency=args.concurrency))
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        if launcher is not None:
            launcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
