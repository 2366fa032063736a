#!/usr/bin/env bash
# perf_analyzer (Triton's load generator) against the embedded CPU Triton serving the default model
# repository (build/model_repository: the tiny seeded SDXL, python-ort leaves). Not run by CI.
# Run from the repository root after `make install` (or any set-up that made .venv):
#
#     bash tests/benchmarks/perf_analyzer.sh
#
# What it does:
#   (a) gets a perf_analyzer binary that runs on glibc 2.34+: the one bundled in the
#       tritonclient==2.51.0 wheel (the 2.52+ binaries need glibc 2.38), plus libb64-0d (apt) and
#       libcudart.so.12 (nvidia-cuda-runtime-cu12, pip --target build/perf_analyzer/cudart, not the
#       project venv); all cached under build/perf_analyzer/;
#   (b) starts the embedded Triton (tests/benchmarks/serve_triton.py) on free loopback ports;
#   (c) measures (i) the decoupled pipeline model fooocus_pipeline over gRPC streaming, one
#       text-to-image task per request (SIZE*SIZE, STEPS steps), with the composing models broken
#       out, and (ii) the unet leaf alone (a CFG batch of 2, the tiny model's shapes), each at
#       concurrency 1 and 2;
#   (d) writes everything to build/perf_analyzer/results.txt (CSV files beside it) and prints a summary;
#   (e) stops Triton (also on failure or Ctrl-C).
#
# Environment knobs: PYTHON (default .venv/bin/python), STEPS (4), SIZE (256), PIPELINE_REQUESTS
# (requests per measurement window of the pipeline case, 10), UNET_WINDOW_MS (2000).
set -euo pipefail

if [[ ! -f pyproject.toml || ! -f tests/benchmarks/serve_triton.py ]]; then
    echo "run this from the repository root: bash tests/benchmarks/perf_analyzer.sh" >&2
    exit 2
fi
ROOT=$(pwd)
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-4}
SIZE=${SIZE:-256}
PIPELINE_REQUESTS=${PIPELINE_REQUESTS:-10}
UNET_WINDOW_MS=${UNET_WINDOW_MS:-2000}
PA_DIR=build/perf_analyzer
PA_BIN=$PA_DIR/bin/perf_analyzer
CUDART_DIR=$PA_DIR/cudart
TRITONCLIENT_VERSION=2.51.0
CUDART_VERSION=12.9.79
RESULTS=$PA_DIR/results.txt
PORTS_FILE=$PA_DIR/ports.json

if [[ ! -x $PY ]]; then
    echo "no Python at $PY: create the project venv first (make install)" >&2
    exit 2
fi
mkdir -p "$PA_DIR/bin" "$PA_DIR/wheels"

# (a) the perf_analyzer binary and its two shared libraries ------------------------------------------
if [[ ! -x $PA_BIN ]]; then
    echo "== downloading tritonclient==$TRITONCLIENT_VERSION (for its perf_analyzer binary)"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$PA_DIR/wheels" \
        "tritonclient==$TRITONCLIENT_VERSION"
    "$PY" - "$PA_DIR/wheels" "$TRITONCLIENT_VERSION" "$PA_BIN" <<'EOF'
import glob, os, shutil, sys, zipfile

wheels_dir, version, dest = sys.argv[1:]
wheels = sorted(glob.glob(os.path.join(wheels_dir, f"tritonclient-{version}-*manylinux*x86_64.whl")))
if not wheels:
    sys.exit(f"no tritonclient {version} manylinux x86_64 wheel in {wheels_dir}")
member = f"tritonclient-{version}.data/data/bin/perf_analyzer"
with zipfile.ZipFile(wheels[-1]) as zf, zf.open(member) as src, open(dest + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
EOF
fi

if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
    echo "== installing libb64-0d (apt)"
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q libb64-0d || { $SUDO apt-get update -q && $SUDO apt-get install -y -q libb64-0d; }
fi

if [[ ! -e $CUDART_DIR/nvidia/cuda_runtime/lib/libcudart.so.12 ]]; then
    echo "== installing nvidia-cuda-runtime-cu12==$CUDART_VERSION into $CUDART_DIR"
    "$PY" -m pip install --quiet --no-deps --upgrade --target "$CUDART_DIR" "nvidia-cuda-runtime-cu12==$CUDART_VERSION"
fi
PA_LD_PATH=$ROOT/$CUDART_DIR/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# Only perf_analyzer gets the CUDA runtime on its library path (not the Triton server).
pa() { LD_LIBRARY_PATH=$PA_LD_PATH "$PA_BIN" "$@"; }

if LD_LIBRARY_PATH=$PA_LD_PATH ldd "$PA_BIN" | grep -q 'not found'; then
    echo "perf_analyzer is missing shared libraries:" >&2
    LD_LIBRARY_PATH=$PA_LD_PATH ldd "$PA_BIN" | grep 'not found' >&2
    exit 1
fi
# The 2.51 binary has no --help (without arguments, or with a bad flag, it prints its usage).
PA_VERSION=$(pa --version 2>&1 | grep -m1 -o 'Perf Analyzer Version [^ ]*' || true)

# (b) the embedded Triton on free loopback ports ---------------------------------------------------
echo "== model repository (cached build)"
"$PY" -m export default >/dev/null
REPO=$ROOT/build/model_repository

SERVER_PID=""
PA_PID=""
cleanup() {
    if [[ -n $PA_PID ]] && kill -0 "$PA_PID" 2>/dev/null; then
        kill -TERM "$PA_PID" 2>/dev/null || true
        wait "$PA_PID" 2>/dev/null || true
    fi
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "== stopping Triton"
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -f "$PORTS_FILE"
echo "== starting the embedded Triton (log: $PA_DIR/triton/tritonserver.log)"
"$PY" -m tests.benchmarks.serve_triton --model-repository "$REPO" --work-dir "$PA_DIR/triton" \
    --ports-file "$PORTS_FILE" >"$PA_DIR/serve_triton.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 480); do
    [[ -s $PORTS_FILE ]] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "Triton did not start; see $PA_DIR/serve_triton.log" >&2
        cat "$PA_DIR/serve_triton.log" >&2
        exit 1
    fi
    sleep 0.5
done
if [[ ! -s $PORTS_FILE ]]; then
    echo "Triton not ready after 240 s; see $PA_DIR/serve_triton.log" >&2
    exit 1
fi
GRPC_PORT=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["grpc"])' "$PORTS_FILE")
URL=127.0.0.1:$GRPC_PORT
echo "== Triton ready, gRPC at $URL"

# (c) the measurements -------------------------------------------------------------------------------
# The pipeline's only input: `task` (BYTES [1]), a JSON text-to-image task (pipeline/task.py fields).
"$PY" - "$PA_DIR/pipeline_input.json" "$SIZE" "$STEPS" <<'EOF'
import json, sys

path, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
task = {"prompt": "a photograph of a cat sitting on a red sofa", "negative_prompt": "",
        "performance_selection": "Speed", "aspect_ratios_selection": f"{size}*{size}", "image_number": 1,
        "image_seed": 1234, "guidance_scale": 4.0, "advanced_params": {"overwrite_step": steps}}
with open(path, "w") as f:
    json.dump({"data": [{"task": [json.dumps(task)]}]}, f, indent=1)
EOF

# The unet's shapes at SIZE (CFG batch 2; context 77 tokens x the model's text width).
read -r LATENT_C LATENT_HW CONTEXT_W POOLED_W < <("$PY" - "$REPO/fooocus_pipeline/1/model_info.json" "$SIZE" <<'EOF'
import json, sys

from pipeline.interfaces import ModelDims

dims = ModelDims.from_json(json.load(open(sys.argv[1]))["dims"])
print(dims.latent_channels, int(sys.argv[2]) // dims.vae_scale_factor, dims.context_dim, dims.pooled_dim)
EOF
)

{
    echo "perf_analyzer on the embedded CPU Triton ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo "binary: ${PA_VERSION:-perf_analyzer} (tritonclient $TRITONCLIENT_VERSION wheel)"
    echo "server: tritonserver from nvidia-pytriton, model repository $REPO"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores"
    echo
} >"$RESULTS"

run_case() {  # run_case NAME ARGS...: one perf_analyzer run, its output appended to results.txt
    local name=$1
    shift
    echo "== $name: perf_analyzer $*" | tee -a "$RESULTS"
    local status=0
    # In the background and waited for, so that a signal to this script stops it at once.
    LD_LIBRARY_PATH=$PA_LD_PATH "$PA_BIN" "$@" -f "$PA_DIR/$name.csv" >"$PA_DIR/$name.log" 2>&1 &
    PA_PID=$!
    wait "$PA_PID" || status=$?
    PA_PID=""
    cat "$PA_DIR/$name.log" >>"$RESULTS"
    echo >>"$RESULTS"
    if [[ $status -ne 0 ]]; then
        echo "perf_analyzer failed ($status) for $name; its output:" >&2
        tail -n 30 "$PA_DIR/$name.log" >&2
        return "$status"
    fi
}

rm -f "$PA_DIR"/pipeline.csv "$PA_DIR"/unet.csv
# (i) one text-to-image job per request over a gRPC stream; latency = until the final response.
run_case pipeline -m fooocus_pipeline -i grpc -u "$URL" --streaming \
    --bls-composing-models=text_encoder_l,text_encoder_g,unet,vae_decoder \
    --input-data "$PA_DIR/pipeline_input.json" --concurrency-range 1:2 \
    --measurement-mode count_windows --measurement-request-count "$PIPELINE_REQUESTS" \
    --stability-percentage 50 --max-trials 6
# (ii) the unet leaf alone: one CFG batch (2 x latent), random FP32 data.
# The leaf's config has Triton's batch axis (max_batch_size > 0): -b 2, shapes without it; the
# per-sample timestep is dims [1] (reshaped to a scalar per sample).
run_case unet -m unet -i grpc -u "$URL" -b 2 \
    --shape "sample:$LATENT_C,$LATENT_HW,$LATENT_HW" --shape timestep:1 \
    --shape "encoder_hidden_states:77,$CONTEXT_W" --shape "text_embeds:$POOLED_W" --shape time_ids:6 \
    --shape "inpaint_latent:$((LATENT_C + 1)),$LATENT_HW,$LATENT_HW" --shape freeu:4 \
    --concurrency-range 1:2 --measurement-interval "$UNET_WINDOW_MS" --stability-percentage 25 --max-trials 8

# (d) the summary --------------------------------------------------------------------------------------
"$PY" - "$PA_DIR" "$SIZE" "$STEPS" "$LATENT_C" "$LATENT_HW" <<'EOF' | tee -a "$RESULTS"
import csv, os, sys

pa_dir, size, steps, c, hw = sys.argv[1:]
cases = [("pipeline", f"fooocus_pipeline, gRPC streaming, {size}x{size}, {steps} steps", "req/s"),
         ("unet", f"unet leaf, gRPC, batch 2 x {c}x{hw}x{hw}", "samples/s")]
print("summary (latency in ms; throughput per second)")
print(f"| case | concurrency | throughput | p50 | p99 |")
print(f"|---|---|---|---|---|")
for name, label, unit in cases:
    with open(os.path.join(pa_dir, f"{name}.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("Concurrency", "").strip().isdigit()]
    for r in rows:
        print(f"| {label} | {r['Concurrency']} | {float(r['Inferences/Second']):.2f} {unit} "
              f"| {int(r['p50 latency']) / 1000:.1f} | {int(r['p99 latency']) / 1000:.1f} |")
EOF
echo "full output: $RESULTS"
# (e) Triton is stopped by the EXIT trap.
