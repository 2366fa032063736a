# Triton Inference Server with this project's python models and exporter.
#
# Base: tritonserver 24.10 (server 2.51.0, the version bundled in nvidia-pytriton 0.7.0 that the
# tests run; CUDA 12.6, TensorRT 10.5, Python 3.10). Added: the project (`pip install .[core]`) in
# the system Python that the python backend stub embeds, for the decoupled BLS pipeline and the
# python-ort / python-torch leaves; TensorRT Python and tqdm for `python -m export tensorrt`.
#
# Build from the repository root:
#   docker build -f docker/triton.Dockerfile -t fooocus-triton/triton:0.1.0 .
# Serve a model repository (see docs/production.md):
#   docker run --gpus all --shm-size 1g -p 8000-8002:8000-8002 -v /path/to/repo:/models fooocus-triton/triton:0.1.0
FROM nvcr.io/nvidia/tritonserver:24.10-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Must equal the base image's TensorRT: a plan only loads in the TensorRT version that built it.
ARG TENSORRT_VERSION=10.5.0

# PYTHONPATH: `python -m export` runs from the source tree, which also holds the files a wheel
# install leaves out (export/configs, the model code in model_repository/).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    PYTHONPATH=/opt/fooocus-triton

WORKDIR /opt/fooocus-triton
COPY pyproject.toml README.md constraints.txt ./
COPY docker/triton-constraints.txt docker/
COPY pipeline/ pipeline/
COPY export/ export/
COPY frontend/ frontend/
COPY model_repository/ model_repository/

# Versions are pinned in docker/triton-constraints.txt.
RUN python3 -m pip install --no-cache-dir -c docker/triton-constraints.txt ".[core]" tqdm

# TensorRT Python: the `tensorrt` module (tensorrt-cu12) and its bindings, built for the
# container's own libnvinfer 10.5 (without the separate library wheel of over 1 GB). Only if
# the base image lacks one of the libraries the bindings link is the matching tensorrt-cu12-libs
# wheel installed (from NVIDIA's package index, where that wheel lives).
RUN NVIDIA_TENSORRT_DISABLE_INTERNAL_PIP=1 python3 -m pip install --no-cache-dir --no-deps \
        -c docker/triton-constraints.txt \
        "tensorrt-cu12==${TENSORRT_VERSION}" "tensorrt-cu12-bindings==${TENSORRT_VERSION}" \
    && if ! { ldconfig -p | grep -q 'libnvinfer\.so\.10 ' \
              && ldconfig -p | grep -q 'libnvinfer_plugin\.so\.10 ' \
              && ldconfig -p | grep -q 'libnvonnxparser\.so\.10 '; }; then \
        python3 -m pip install --no-cache-dir -c docker/triton-constraints.txt \
            --extra-index-url https://pypi.nvidia.com "tensorrt-cu12-libs==${TENSORRT_VERSION}"; \
    fi

# `python` for the documented commands; a non-root user (the base image has triton-server);
# a writable build/ for the exporter's defaults (TensorRT timing cache, converted checkpoints).
RUN if ! command -v python >/dev/null; then ln -s "$(command -v python3)" /usr/local/bin/python; fi \
    && if ! id -u triton-server >/dev/null 2>&1; then useradd --create-home --shell /bin/bash triton-server; fi \
    && install -d -m 1777 /opt/fooocus-triton/build

# The base image's non-root user, by name: the fallback above may have created it with another uid.
# hadolint ignore=DL3066
USER triton-server

# HTTP/REST, gRPC, Prometheus metrics.
EXPOSE 8000 8001 8002

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]

CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", "--load-model=*", \
     "--exit-timeout-secs=10", "--cuda-memory-pool-byte-size=0:268435456"]
