"""Runs and supervises the `tritonserver` binary bundled in the nvidia-pytriton wheel (python
backend only): the embedded default used by `make run` and the tests.

The launcher lays out a backend directory with the python backend and the stub built for the
running Python, starts the server with the running virtual environment first on PATH (that is how
the stub's interpreter finds the venv's packages), waits for readiness, and restarts the server if
it dies. Jobs that were running when it died fail on their broken gRPC stream; jobs queued behind
them wait for readiness and then run.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def pytriton_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed: it provides the tritonserver binary "
                           "(pip install --no-deps nvidia-pytriton==0.7.0)")
    return Path(spec.submodule_search_locations[0])


def _install(src: Path, dst: Path) -> None:
    """Copy unless identical; replace by rename so a binary that a running server uses stays valid."""
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a server's process group (it runs in a session of its own)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent() -> None:
    """In the child: ask the kernel to SIGTERM the server if the launching thread dies, so a
    crashed or killed frontend never leaves an orphaned Triton holding the ports."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class TritonLauncher:
    model_repository: Path
    work_dir: Path
    host: str = "127.0.0.1"
    http_port: int = 18000
    grpc_port: int = 18001
    metrics_port: int = 18002
    exit_timeout_s: int = 5
    ready_timeout_s: float = 180.0
    restart: bool = True
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.model_repository = Path(self.model_repository).resolve()
        self.work_dir = Path(self.work_dir).resolve()
        self.log_file = self.work_dir / "tritonserver.log"
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self.restarts = 0

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _backend_dir(self) -> Path:
        root = pytriton_dir() / "tritonserver"
        backend = self.work_dir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise RuntimeError(f"the bundled Triton has no python backend stub for Python {version}")
        for src in (root / "backends" / "python" / "libtriton_python.so",
                    root / "backends" / "python" / "triton_python_backend_utils.py", stub):
            _install(src, backend / src.name)
        return backend.parent

    def _command(self) -> list[str]:
        return [
            str(pytriton_dir() / "tritonserver" / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self._backend_dir()}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--model-control-mode=explicit", "--load-model=*",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0", "--strict-readiness=true",
            *self.extra_args,
        ]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        venv_bin = str(Path(sys.prefix) / "bin")
        # The stub's embedded Python finds the venv through the first python3 on PATH.
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        libs = [sysconfig.get_config_var("LIBDIR") or "", str(pytriton_dir().parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")])
        env.pop("PYTHONPATH", None)
        return env

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _spawn(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log_handle = open(self.log_file, "ab")
        self._proc = subprocess.Popen(self._command(), env=self._env(), stdout=log_handle,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        log_handle.close()
        log.info("tritonserver started (pid %d), log: %s", self._proc.pid, self.log_file)

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.ready_timeout_s)
        while time.monotonic() < deadline:
            if self.is_ready():
                return
            proc = self._proc
            if proc is not None and proc.poll() is not None and not self.restart:
                raise RuntimeError(f"tritonserver exited with {proc.returncode}; see {self.log_file}")
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver not ready after {timeout or self.ready_timeout_s:.0f} s; see {self.log_file}")

    def start(self) -> "TritonLauncher":
        with self._lock:
            self._stopping.clear()
            self._spawn()
        self.wait_ready()
        if self.restart:
            self._supervisor = threading.Thread(target=self._supervise, name="triton-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            proc = self._proc
            code = proc.wait() if proc else None
            if self._stopping.is_set():
                return
            log.error("tritonserver (pid %s) exited with %s; restarting", proc.pid if proc else None, code)
            if proc is not None:
                _kill_group(proc.pid)  # python backend stubs that outlived their server
            self.restarts += 1
            time.sleep(0.5)  # let the kernel release the ports
            with self._lock:
                if self._stopping.is_set():
                    return
                self._spawn()
            try:
                self.wait_ready()
                log.info("tritonserver is ready again (restart %d)", self.restarts)
            except TimeoutError as exc:
                log.error("%s", exc)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.exit_timeout_s + 10)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver did not stop in time; killing it")
            proc.kill()
            proc.wait()
        _kill_group(proc.pid)
        log.info("tritonserver stopped")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
