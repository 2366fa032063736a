"""Serve a model repository with the embedded Triton (the tritonserver bundled in nvidia-pytriton)
on free loopback ports until killed. Used by tests/benchmarks/perf_analyzer.sh; not a pytest test.
Run from the repository root:

    .venv/bin/python -m tests.benchmarks.serve_triton [--model-repository DIR] [--ports-file FILE]

Once the server is ready it prints one JSON line {"http": P, "grpc": P, "metrics": P, "pid": PID}
(and writes it to --ports-file when given); SIGTERM or SIGINT stops the server and exits 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.serve_triton", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=ROOT / "build" / "model_repository")
    p.add_argument("--work-dir", type=Path, default=ROOT / "build" / "perf_analyzer" / "triton",
                   help="backend directory and tritonserver.log")
    p.add_argument("--ports-file", type=Path, default=None, help="also write the ports JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    from frontend.triton_launcher import TritonLauncher

    if not (args.model_repository / "fooocus_pipeline" / "config.pbtxt").exists():
        print(f"no model repository at {args.model_repository}; build it with `.venv/bin/python -m export default`",
              file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # restart=False: a server that dies during a measurement should fail the run, not hide in it.
    launcher = TritonLauncher(args.model_repository, args.work_dir, http_port=free_port(), grpc_port=free_port(),
                              metrics_port=free_port(), restart=False)
    launcher.start()
    try:
        ports = {"http": launcher.http_port, "grpc": launcher.grpc_port, "metrics": launcher.metrics_port,
                 "pid": launcher.pid}
        line = json.dumps(ports)
        if args.ports_file is not None:
            args.ports_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.ports_file.with_name(args.ports_file.name + ".tmp")
            tmp.write_text(line + "\n")
            tmp.replace(args.ports_file)
        print(line, flush=True)
        while not stop.wait(0.5):
            proc = launcher._proc
            if proc is not None and proc.poll() is not None:
                print(f"tritonserver exited with {proc.returncode}; see {launcher.log_file}", file=sys.stderr)
                return 1
    finally:
        launcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
