# The Fooocus-API frontend (FastAPI + the job system) for a separately running Triton.
#
# It needs only the base dependencies of pyproject.toml (no torch: the `core` extra is for Triton's
# python models and the exporter). Build from the repository root:
#   docker build -f docker/frontend.Dockerfile -t fooocus-triton/frontend:0.1.0 .
# Run (see docs/production.md and docker/compose.yaml):
#   docker run -p 8888:8888 -v fooocus-outputs:/data/outputs fooocus-triton/frontend:0.1.0 \
#       python -m frontend --host 0.0.0.0 --triton-url TRITON_HOST:8001 --output-dir /data/outputs/files
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/fooocus-triton
COPY pyproject.toml README.md constraints.txt ./
COPY pipeline/ pipeline/
COPY export/ export/
COPY frontend/ frontend/

# Versions are pinned in constraints.txt (its torch pin does not apply: torch is not installed).
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --create-home --uid 10001 --shell /usr/sbin/nologin fooocus \
    && install -d -o fooocus -g fooocus /data/outputs /data/models/checkpoints /data/models/loras

USER 10001
WORKDIR /data

EXPOSE 8888

# /ping answers 200, or 403 when --apikey is set (it is behind the key, as in Fooocus-API): both
# mean the API is up. (No curl in the slim image: Python's http.client.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import http.client as h; c = h.HTTPConnection('127.0.0.1', 8888, timeout=4); c.request('GET', '/ping'); raise SystemExit(c.getresponse().status not in (200, 403))"]

# Files and the default SQLite job store go to /data/outputs (a volume); set --base-url to the
# address clients use (file URLs start with it) and FOOOCUS_DB_CONF or --database-url for PostgreSQL.
CMD ["python", "-m", "frontend", "--host", "0.0.0.0", "--port", "8888", "--triton-url", "triton:8001", \
     "--output-dir", "/data/outputs/files", "--checkpoints-dir", "/data/models/checkpoints", \
     "--loras-dir", "/data/models/loras"]
