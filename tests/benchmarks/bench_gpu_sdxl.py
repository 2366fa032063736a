"""GPU benchmark: full-size SDXL base (seeded random weights, fp16) on one CUDA GPU, two paths:

  diffusers  StableDiffusionXLPipeline in torch on the GPU, in process (the reference);
  served     POST /v1/generation/text-to-image -> frontend -> the bundled Triton (nvidia-pytriton's
             tritonserver, python backend only) -> the BLS pipeline model -> `python-torch` leaf
             models running the same torch modules on CUDA in fp16.

Not a pytest test; needs an NVIDIA GPU and a CUDA build of torch. Run from the repository root:

    .venv/bin/python -m tests.benchmarks.bench_gpu_sdxl [--steps 30] [--size 1024] [--repeats 3]
                                                        [--out FILE] [--work DIR]

Speed needs no trained checkpoint: the SDXL base architecture (export/configs/sdxl_base) is built
with seeded random weights on the GPU and saved once as a diffusers folder under --work (reused
when present). Both paths: SIZExSIZE, euler with karras sigmas, guidance 4.0 (CFG as one UNet
batch of 2), one image, a fixed seed; one untimed warm-up then --repeats timed runs.

s/image: diffusers, the whole pipeline call between two torch.cuda.synchronize(); served, the
synchronous HTTP request (text encoders, sampling, VAE, PNG file, job bookkeeping included).
it/s (the denoising loop): diffusers, (steps-1) / the time between the step-end callbacks of the
first and the last step (CUDA-synchronised); served, 1 / the mean of the frontend's
fooocus_step_seconds histogram over the timed runs (the time between two consecutive step events).

The VAE decodes in fp32 on both paths by default (`--vae fp32`): the SDXL VAE overflows in fp16
(its config says force_upcast, which diffusers honours; the served vae_decoder leaf is switched to
float32 in the written repository). `--vae fp16` runs both in fp16.

Before loading the served models a tiny probe model is served alone to show whether torch can use
CUDA inside the python backend stub. The BLS pipeline reads leaf outputs with `as_numpy()`; the
python backend leaves a BLS output on the GPU when the leaf produced it there, so with
`--served-fallback auto` (default) a failed served warm-up is retried on patched copies in the
written repository (never the project's sources): first the BLS requests ask for CPU outputs
(preferred_memory), then the leaves also copy their outputs to the host. The report says which
variant produced the served numbers and why the others failed.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import argparse
import gc
import json
import logging
import math
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a photograph of a cat sitting on a red sofa"
SEED = 1234
GUIDANCE = 4.0
INIT_SEED = 0  # the random weights
CHECKPOINT_NAME = f"sdxl-base-random-seed{INIT_SEED}-fp16"
PROG = "python -m tests.benchmarks.bench_gpu_sdxl"

# serving_anchors.md §0 and §4 (1024x1024, 30 steps, CFG, batch 1)
UNET_TFLOP_PER_CFG_STEP_1024 = 13.5
ANCHORS_H100 = ("published H100 anchors at 1024², 30 steps: PyTorch baseline 2.50 s/image and TensorRT fp16 "
                "1.47 s/image (Baseten); diffusers eager 14.9 it/s, torch.compile 18.5 it/s, stable-fast 21.6 it/s; "
                "physical floor 0.42 s/image at 989 TF/s dense fp16 (serving_anchors.md §0, §4)")

log = logging.getLogger("bench-gpu")


# ------------------------------------------------------------------------------------------------
# GPU and environment

def cuda_problem() -> str | None:
    """None when torch sees a CUDA GPU, else a message that says why not."""
    try:
        import torch
    except ImportError as exc:
        return f"torch cannot be imported ({exc})"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return None
    build = torch.version.cuda or "none: a CPU-only wheel"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = ""
    if shutil.which("nvidia-smi"):
        hint = " nvidia-smi is present, so a GPU may be installed that this torch build cannot use."
    return (f"no CUDA GPU is visible to torch (torch {torch.__version__}, CUDA build {build}, "
            f"CUDA_VISIBLE_DEVICES={visible if visible is not None else 'unset'}).{hint} This benchmark needs an "
            f"NVIDIA GPU and a CUDA build of torch; the CPU benchmark is tests/benchmarks/bench_text_to_image.py.")


def gpu_description() -> str:
    import subprocess

    import torch

    props = torch.cuda.get_device_properties(0)
    text = f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor})"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        if driver:
            text += f", driver {driver}"
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    parts = [f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    for dist in ("diffusers", "transformers", "nvidia-pytriton"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def gib_free() -> float:
    import torch

    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


# ------------------------------------------------------------------------------------------------
# The random-weight SDXL checkpoint

def build_checkpoint(folder: Path, device: str = "cuda") -> Path:
    """SDXL base (export/configs/sdxl_base) with seeded random weights, saved in fp16 as a diffusers
    folder. Built on `device` (the GPU: seconds; default PyTorch/transformers initialisation, whose
    scales keep fp16 activations finite) and written atomically; reused when present."""
    if (folder / "model_index.json").exists():
        log.info("random-weight SDXL checkpoint present: %s", folder)
        return folder
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from export.checkpoint import CONFIG_DIR
    from export.tokenizer import sdxl_tokenizers

    start = time.perf_counter()
    log.info("building the full-size SDXL base with seeded random weights on %s ...", device)
    with torch.device(device):
        torch.manual_seed(INIT_SEED)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR / "unet"))
        torch.manual_seed(INIT_SEED + 1)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR / "vae"))
        torch.manual_seed(INIT_SEED + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder"))
        torch.manual_seed(INIT_SEED + 3)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder_2"))
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().to(torch.float16)
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(CONFIG_DIR / "scheduler"))
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    tok, tok2 = sdxl_tokenizers(partial / ".vocab")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
                              tokenizer_2=tok2, unet=unet, scheduler=scheduler,
                              force_zeros_for_empty_prompt=True).save_pretrained(partial)
    shutil.rmtree(partial / ".vocab", ignore_errors=True)
    params = sum(p.numel() for p in unet.parameters()) / 1e9
    del unet, vae, text_encoder, text_encoder_2
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    log.info("saved %s (UNet %.2f B parameters) in %.0f s", folder, params, time.perf_counter() - start)
    return folder


# ------------------------------------------------------------------------------------------------
# Results

@dataclass
class PathResult:
    name: str
    seconds: list[float] = field(default_factory=list)  # per timed image
    its: list[float] = field(default_factory=list)  # denoising-loop it/s per timed image
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def s_image(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def it_s(self) -> float:
        finite = [v for v in self.its if math.isfinite(v)]
        return statistics.median(finite) if finite else math.nan


def _num(v: float, fmt: str) -> str:
    return format(v, fmt) if math.isfinite(v) else "n/a"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if math.isfinite(a) and math.isfinite(b) and b > 0 else "n/a"


def markdown_table(results: list[PathResult], reference: PathResult | None) -> str:
    lines = [("| path | s/image (median) | min–max s | it/s (denoising loop) | s/image served/diffusers "
              "| it/s served/diffusers |"),
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.error and not r.seconds:
            lines.append(f"| {r.name} | failed | | | | |")
            continue
        spread = f"{min(r.seconds):.3f}–{max(r.seconds):.3f}"
        ref_s = reference.s_image if reference else math.nan
        ref_i = reference.it_s if reference else math.nan
        lines.append(f"| {r.name} | {r.s_image:.3f} | {spread} | {_num(r.it_s, '.2f')} | "
                     f"{_ratio(r.s_image, ref_s)} | {_ratio(r.it_s, ref_i)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# diffusers

class DiffusersPath:
    """StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=float16) on CUDA, euler + karras."""

    def __init__(self, folder: Path, vae_fp16: bool):
        import diffusers.utils.logging as diffusers_logging
        import torch
        import transformers.utils.logging as transformers_logging
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        for lib in (diffusers_logging, transformers_logging):
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), torch_dtype=torch.float16,
                                                         local_files_only=True, add_watermarker=False)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
        # force_upcast (the SDXL VAE config) makes diffusers decode in fp32; off for --vae fp16
        pipe.vae.register_to_config(force_upcast=not vae_fp16)
        pipe.to("cuda")
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.last_latents_finite: bool | None = None

    def __call__(self, size: int, steps: int, output_type: str = "pil"):
        """(seconds for the call, denoising-loop it/s, output)."""
        import torch

        marks: dict[int, float] = {}

        def on_step_end(pipe, i, t, kwargs):
            if i == 0 or i == steps - 1:
                torch.cuda.synchronize()
                marks[i] = time.perf_counter()
            if i == steps - 1:
                self.last_latents_finite = bool(torch.isfinite(kwargs["latents"]).all().item())
            return {}

        generator = torch.Generator("cuda").manual_seed(SEED)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                            generator=generator, output_type=output_type, callback_on_step_end=on_step_end,
                            callback_on_step_end_tensor_inputs=["latents"])
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        its = math.nan
        if steps > 1 and 0 in marks and steps - 1 in marks and marks[steps - 1] > marks[0]:
            its = (steps - 1) / (marks[steps - 1] - marks[0])
        return seconds, its, out

    def close(self):
        import torch

        del self.pipe
        gc.collect()
        torch.cuda.empty_cache()


def run_diffusers(folder: Path, size: int, steps: int, repeats: int, vae_fp16: bool) -> PathResult:
    import numpy as np

    result = PathResult("diffusers StableDiffusionXLPipeline, in process (fp16 CUDA)")
    start = time.perf_counter()
    path = DiffusersPath(folder, vae_fp16)
    result.notes.append(f"diffusers: pipeline loaded to the GPU in {time.perf_counter() - start:.0f} s")
    try:
        seconds, its, out = path(size, steps, output_type="np")  # warm-up (untimed), also checks the numbers
        image = out.images[0]
        finite = bool(np.isfinite(image).all())
        log.info("diffusers warm-up: %.3f s (%.2f it/s); latents finite: %s, image finite: %s",
                 seconds, its, path.last_latents_finite, finite)
        if not (finite and path.last_latents_finite):
            result.notes.append("diffusers: the random-weight model produced non-finite values (timings still "
                                "valid: the same kernels run)")
        for k in range(repeats):
            seconds, its, out = path(size, steps)
            assert out.images[0].size == (size, size), out.images[0].size
            result.seconds.append(seconds)
            result.its.append(its)
            log.info("diffusers run %d/%d: %.3f s, %.2f it/s", k + 1, repeats, seconds, its)
    finally:
        path.close()
    return result


# ------------------------------------------------------------------------------------------------
# served: repository, Triton, frontend

PROBE_MODEL = '''"""Reports what torch sees inside the python backend stub (written by bench_gpu_sdxl)."""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        info = {"python": sys.version.split()[0], "executable": sys.executable,
                "instance_kind": args.get("model_instance_kind"),
                "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
        self.cuda = False
        try:
            import torch

            info.update(torch=torch.__version__, torch_cuda_build=torch.version.cuda,
                        cuda_available=torch.cuda.is_available())
            if info["cuda_available"]:
                info["device_count"] = torch.cuda.device_count()
                info["device"] = torch.cuda.get_device_name(0)
                a = torch.randn(512, 512, device="cuda", dtype=torch.float16)
                info["fp16_matmul_finite"] = bool(torch.isfinite(a @ a).all().item())
                self.cuda = True
        except Exception as exc:  # the report is the point: never fail to load
            info["error"] = f"{type(exc).__name__}: {exc}"
        self.info = info

    def execute(self, requests):
        responses = []
        for _ in requests:
            info = dict(self.info)
            if self.cuda:
                import torch

                gpu = pb_utils.Tensor.from_dlpack("gpu", torch.arange(4, device="cuda", dtype=torch.float32))
                info["gpu_output_tensor_is_cpu"] = gpu.is_cpu()
            else:
                gpu = pb_utils.Tensor("gpu", np.arange(4, dtype=np.float32))
            report = pb_utils.Tensor("report", np.array([json.dumps(info).encode()], dtype=np.object_))
            responses.append(pb_utils.InferenceResponse([report, gpu]))
        return responses
'''

PROBE_CONFIG = '''name: "cuda_probe"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [
  { name: "report" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "gpu" data_type: TYPE_FP32 dims: [ 4 ] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
'''

# Patched copies of the written repository (never the project's sources), tried in this order when
# the served warm-up fails: (label, {model dir: (file, old text, new text)}).
BLS_CPU = ("fooocus_pipeline", "1/model.py", "pb_utils.InferenceRequest(",
           "pb_utils.InferenceRequest(preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0), ")
LEAF_NAMES = ("text_encoder_l", "text_encoder_g", "unet", "vae_encoder", "vae_decoder")
LEAF_HOST = [(leaf, "1/model.py", "t.float().contiguous()", "t.float().cpu().contiguous()") for leaf in LEAF_NAMES]
VARIANTS = (
    ("as shipped", []),
    ("patched: BLS preferred_memory=CPU", [BLS_CPU]),
    ("patched: BLS preferred_memory=CPU + leaves return host tensors", [BLS_CPU, *LEAF_HOST]),
)


def launch_triton(repo: Path, work_dir: Path, ready_timeout_s: float):
    """tests.conftest.start_triton with two changes: no restart (a stub that cannot start must fail
    the run, not loop) and a longer readiness limit (five full-size leaves load at start)."""
    from frontend.triton_launcher import TritonLauncher
    from tests.conftest import free_port

    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "tritonserver.log").unlink(missing_ok=True)
    launcher = TritonLauncher(repo, work_dir, http_port=free_port(), grpc_port=free_port(),
                              metrics_port=free_port(), restart=False, ready_timeout_s=ready_timeout_s)
    return launcher.start()


def log_excerpt(log_file: Path, limit: int = 25) -> str:
    """The lines of a tritonserver.log that look like errors (or its tail)."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {log_file})"
    pattern = re.compile(r"error|Error|ERROR|failed|Failed|Traceback|exception|Exception|CUDA|cuda")
    hits = [ln for ln in lines if pattern.search(ln)]
    chosen = hits[-limit:] if hits else lines[-limit:]
    return "\n".join("    " + ln[:400] for ln in chosen)


def http_json(url: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:1000]}") from None
    return json.loads(text) if text.strip() else {}


def probe_stub_cuda(work: Path, timeout_s: float) -> tuple[bool, str]:
    """Serve the probe model alone and ask it what torch sees inside the stub."""
    repo = work / "probe_repository"
    shutil.rmtree(repo, ignore_errors=True)
    (repo / "cuda_probe" / "1").mkdir(parents=True)
    (repo / "cuda_probe" / "1" / "model.py").write_text(PROBE_MODEL)
    (repo / "cuda_probe" / "config.pbtxt").write_text(PROBE_CONFIG)
    try:
        triton = launch_triton(repo, work / "triton-probe", timeout_s)
    except Exception as exc:  # noqa: BLE001 - the probe's failure is the report
        return False, (f"the bundled tritonserver did not start with the probe model: {exc}\n"
                       f"{log_excerpt(work / 'triton-probe' / 'tritonserver.log')}")
    try:
        body = {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [0]}],
                "outputs": [{"name": "report"}, {"name": "gpu"}]}
        out = {o["name"]: o for o in http_json(f"{triton.http_url}/v2/models/cuda_probe/infer", body, 120)["outputs"]}
        info = json.loads(out["report"]["data"][0])
        server = http_json(f"{triton.http_url}/v2", timeout=10)
        info["tritonserver"] = server.get("version")
        info["gpu_output_received"] = out["gpu"]["data"]
        ok = bool(info.get("cuda_available")) and info.get("fp16_matmul_finite", False)
        return ok, json.dumps(info)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is reported
        return False, (f"the probe request failed: {type(exc).__name__}: {exc}\n"
                       f"{log_excerpt(triton.log_file)}")
    finally:
        triton.stop()


def write_served_repository(folder: Path, repo: Path, work: Path, vae_fp16: bool) -> Path:
    from export.__main__ import write_torch_repository

    write_torch_repository(folder, repo, device="gpu", work=work)
    gc.collect()
    if not vae_fp16:  # decode in fp32 like diffusers with force_upcast
        config = repo / "vae_decoder" / "config.pbtxt"
        text = config.read_text()
        old = 'key: "dtype"\n  value: { string_value: "float16" }'
        if text.count(old) != 1:
            raise RuntimeError(f"{config}: cannot switch the VAE decoder to float32 (dtype parameter not found)")
        config.write_text(text.replace(old, old.replace("float16", "float32")))
    return repo


def apply_patches(repo: Path, patches) -> list[str]:
    """Edit the written repository's copies; returns the models to reload."""
    changed = []
    for model, rel, old, new in patches:
        path = repo / model / rel
        text = path.read_text()
        if new in text:
            continue
        if text.count(old) != 1:
            raise RuntimeError(f"{path}: expected exactly one {old!r} to patch")
        path.write_text(text.replace(old, new))
        changed.append(model)
    return changed


def reload_models(triton, models: list[str]) -> None:
    """Explicit model control: loading a loaded model reloads it from the (patched) repository.
    Leaves first, the pipeline last."""
    order = sorted(set(models), key=lambda m: m == "fooocus_pipeline")
    for model in order:
        log.info("reloading %s ...", model)
        http_json(f"{triton.http_url}/v2/repository/models/{model}/load", {}, timeout=600)


def prom_values(text: str, names: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """{(metric, model label or ''): value} for the named metrics of a Prometheus text page."""
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) not in names:
            continue
        model = re.search(r'model="([^"]*)"', m.group(2) or "")
        key = (m.group(1), model.group(1) if model else "")
        try:
            values[key] = values.get(key, 0.0) + float(m.group(3))
        except ValueError:
            pass
    return values


STEP_METRICS = ("fooocus_step_seconds_sum", "fooocus_step_seconds_count")
TRITON_METRICS = ("nv_inference_request_success", "nv_inference_request_duration_us",
                  "nv_inference_compute_infer_duration_us")


class ServedPath:
    def __init__(self, frontend, triton):
        self.frontend = frontend
        self.triton = triton

    @staticmethod
    def body(size: int, steps: int, async_process: bool = False) -> dict:
        return {"prompt": PROMPT, "aspect_ratios_selection": f"{size}*{size}", "image_seed": SEED,
                "guidance_scale": GUIDANCE, "sharpness": 0, "style_selections": [], "image_number": 1,
                "async_process": async_process,
                "advanced_params": {"sampler_name": "euler", "scheduler_name": "karras", "overwrite_step": steps,
                                    "disable_preview": True}}

    def step_metrics(self) -> dict:
        r = self.frontend.client.get("/metrics")
        r.raise_for_status()
        return prom_values(r.text, STEP_METRICS)

    def triton_metrics(self) -> dict:
        with urllib.request.urlopen(f"http://{self.triton.host}:{self.triton.metrics_port}/metrics", timeout=10) as r:
            return prom_values(r.read().decode(), TRITON_METRICS)

    def warm_up(self, size: int, steps: int, timeout_s: float) -> tuple[bool, str, float]:
        """One asynchronous job, so that a failure comes back with its message."""
        start = time.perf_counter()
        r = self.frontend.client.post("/v1/generation/text-to-image", json=self.body(size, steps, True))
        if r.status_code != 200:
            return False, f"HTTP {r.status_code}: {r.text[:500]}", time.perf_counter() - start
        job_id = r.json().get("job_id")
        try:
            job = self.frontend.wait_job(job_id, timeout=timeout_s)
        except TimeoutError:
            return False, f"no result after {timeout_s:.0f} s", time.perf_counter() - start
        seconds = time.perf_counter() - start
        if job["job_stage"] != "SUCCESS":
            return False, str(job.get("job_status")), seconds
        return True, "SUCCESS", seconds

    def __call__(self, size: int, steps: int) -> tuple[float, float]:
        before = self.step_metrics()
        start = time.perf_counter()
        r = self.frontend.client.post("/v1/generation/text-to-image", json=self.body(size, steps))
        seconds = time.perf_counter() - start
        if r.status_code != 200:
            raise RuntimeError(f"served request failed: HTTP {r.status_code} {r.text[:500]}")
        results = r.json()
        if len(results) != 1 or results[0].get("finish_reason") != "SUCCESS":
            raise RuntimeError(f"served request did not succeed: {results}")
        after = self.step_metrics()
        n = after.get(("fooocus_step_seconds_count", ""), 0) - before.get(("fooocus_step_seconds_count", ""), 0)
        s = after.get(("fooocus_step_seconds_sum", ""), 0) - before.get(("fooocus_step_seconds_sum", ""), 0)
        return seconds, (n / s if n > 0 and s > 0 else math.nan)


def breakdown(before: dict, after: dict, images: int) -> tuple[str, float]:
    """Per-call Triton durations of each model over the timed runs, and the UNet's ms per call."""
    parts, unet_ms = [], math.nan
    for model in ("text_encoder_l", "text_encoder_g", "unet", "vae_decoder"):
        calls = after.get(("nv_inference_request_success", model), 0) - before.get(
            ("nv_inference_request_success", model), 0)
        if calls <= 0:
            continue
        req = (after.get(("nv_inference_request_duration_us", model), 0)
               - before.get(("nv_inference_request_duration_us", model), 0)) / calls / 1000
        comp = (after.get(("nv_inference_compute_infer_duration_us", model), 0)
                - before.get(("nv_inference_compute_infer_duration_us", model), 0)) / calls / 1000
        parts.append(f"{model} {calls / images:.0f} call(s)/image, {req:.1f} ms/call in Triton "
                     f"({comp:.1f} ms compute)")
        if model == "unet":
            unet_ms = req
    return "; ".join(parts), unet_ms


def run_served(folder: Path, work: Path, size: int, steps: int, repeats: int, vae_fp16: bool,
               fallback: str, ready_timeout_s: float) -> tuple[PathResult, list[str]]:
    """The served path; returns the result (error set when no variant worked) and report notes."""
    from tests.conftest import served_frontend

    notes: list[str] = []
    result = PathResult("served: HTTP → frontend → Triton BLS → python-torch leaves (fp16 CUDA)")

    log.info("probing CUDA inside the python backend stub ...")
    ok, report = probe_stub_cuda(work, min(ready_timeout_s, 180))
    notes.append(f"stub CUDA probe ({'CUDA usable' if ok else 'CUDA NOT usable'} inside the python backend stub): "
                 f"{report}")
    log.info("stub CUDA probe: %s", report)
    if not ok:
        result.error = ("torch cannot use CUDA inside the bundled Triton's python backend stub, so the "
                        "python-torch leaves cannot run on the GPU (see the probe note)")
        return result, notes

    start = time.perf_counter()
    repo = write_served_repository(folder, work / "repository", work, vae_fp16)
    notes.append(f"served: python-torch repository written in {time.perf_counter() - start:.0f} s ({repo})")

    free_before = gib_free()
    start = time.perf_counter()
    log.info("starting Triton with the full-size python-torch repository (loading five leaves) ...")
    try:
        triton = launch_triton(repo, work / "triton", ready_timeout_s)
    except Exception as exc:  # noqa: BLE001 - why Triton did not start is the report
        excerpt = log_excerpt(work / "triton" / "tritonserver.log")
        cuda_hint = " (the log mentions CUDA: CUDA looks unusable in a leaf's stub)" if "cuda" in excerpt.lower() else ""
        result.error = f"Triton did not become ready: {exc}{cuda_hint}\n{excerpt}"
        return result, notes
    used = free_before - gib_free()
    notes.append(f"served: Triton ready in {time.perf_counter() - start:.0f} s; its processes hold {used:.1f} GiB "
                 f"of GPU memory" + ("" if used > 3 else " — less than the fp16 UNet alone: are the leaves on the GPU?"))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-outputs-") as tmp, \
                served_frontend(triton.grpc_url, Path(tmp) / "outputs", triton_ready_timeout_s=ready_timeout_s) \
                as frontend:
            served = ServedPath(frontend, triton)
            variants = VARIANTS if fallback == "auto" else VARIANTS[:1]
            chosen = None
            for label, patches in variants:
                if patches:
                    changed = apply_patches(repo, patches)
                    try:
                        reload_models(triton, changed)
                    except Exception as exc:  # noqa: BLE001 - a failed reload is reported, then the run stops
                        notes.append(f"served [{label}]: reload failed: {exc}\n{log_excerpt(triton.log_file)}")
                        break
                ok, message, seconds = served.warm_up(size, steps, timeout_s=600)
                if ok:
                    log.info("served warm-up [%s]: %.3f s", label, seconds)
                    chosen = label
                    break
                notes.append(f"served [{label}]: the warm-up job failed: {message}")
                log.warning("served warm-up [%s] failed: %s", label, message)
                if message.startswith("no result after"):
                    break  # a hung job: later variants would queue behind it
            if chosen is None:
                result.error = ("no served variant produced an image:\n"
                                + "\n".join(n for n in notes if n.startswith("served [")))
                result.error += f"\n  tritonserver.log:\n{log_excerpt(triton.log_file)}"
                return result, notes
            result.name = f"served [{chosen}]: HTTP → frontend → Triton BLS → python-torch leaves (fp16 CUDA)"
            if chosen != "as shipped":
                notes.append(f"served: the numbers come from the {chosen!r} variant; the shipped repository failed "
                             f"on this GPU (see above)")
            t_before = served.triton_metrics()
            for k in range(repeats):
                seconds, its = served(size, steps)
                result.seconds.append(seconds)
                result.its.append(its)
                log.info("served run %d/%d: %.3f s, %.2f it/s", k + 1, repeats, seconds, its)
            detail, unet_ms = breakdown(t_before, served.triton_metrics(), repeats)
            if detail:
                notes.append(f"served breakdown (Triton metrics, timed runs): {detail}")
            if math.isfinite(unet_ms) and math.isfinite(result.it_s):
                step_ms = 1000 / result.it_s
                notes.append(f"served: {step_ms:.1f} ms per step, of which {unet_ms:.1f} ms in the unet leaf (Triton "
                             f"request time): {step_ms - unet_ms:.1f} ms per step outside it (BLS round trip, host "
                             f"copies, sampler math on the CPU, progress event)")
    except Exception as exc:  # noqa: BLE001 - any failure is reported with the log
        result.error = f"{type(exc).__name__}: {exc}\n{log_excerpt(triton.log_file)}"
    finally:
        triton.stop()
    return result, notes


# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    parser.add_argument("--size", type=int, default=1024, help="image width and height, a multiple of 32 (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path after one warm-up (default 3)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "gpu-bench",
                        help="checkpoint, repository and Triton logs (default build/gpu-bench)")
    parser.add_argument("--vae", choices=("fp32", "fp16"), default="fp32",
                        help="VAE decode precision on both paths (default fp32: SDXL's VAE overflows in fp16)")
    parser.add_argument("--skip-diffusers", action="store_true", help="only the served path")
    parser.add_argument("--skip-served", action="store_true", help="only the diffusers path")
    parser.add_argument("--served-fallback", choices=("auto", "never"), default="auto",
                        help="auto: when the shipped repository fails, retry on patched copies (see above)")
    parser.add_argument("--ready-timeout", type=float, default=420, help="seconds for Triton to load (default 420)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (it/s needs two step timestamps)")
    if args.size < 64 or args.size % 32:
        parser.error("--size must be a multiple of 32, at least 64")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.skip_diffusers and args.skip_served:
        parser.error("nothing to run: both --skip-diffusers and --skip-served")
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "diffusers", "transformers", "frontend", "pipeline"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*upcast_vae.*")
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*")
    command = shlex.join([".venv/bin/python", "-m", "tests.benchmarks.bench_gpu_sdxl",
                          *(sys.argv[1:] if argv is None else argv)])

    problem = cuda_problem()
    if problem:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return 2

    import torch

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    gpu = gpu_description()
    log.info("GPU: %s; %s", gpu, versions())
    vae_fp16 = args.vae == "fp16"
    notes: list[str] = []

    start = time.perf_counter()
    folder = build_checkpoint(work / CHECKPOINT_NAME)
    notes.append(f"checkpoint: {folder} (ready in {time.perf_counter() - start:.0f} s)")

    results: list[PathResult] = []
    reference = None
    if not args.skip_diffusers:
        try:
            reference = run_diffusers(folder, args.size, args.steps, args.repeats, vae_fp16)
        except Exception as exc:
            log.exception("diffusers path failed")
            reference = PathResult("diffusers StableDiffusionXLPipeline, in process (fp16 CUDA)",
                                   error=f"{type(exc).__name__}: {exc}")
        results.append(reference)
        notes.extend(reference.notes)
        log.info("diffusers: %s s/image (median), %s it/s", _num(reference.s_image, ".3f"),
                 _num(reference.it_s, ".2f"))
        gc.collect()
        torch.cuda.empty_cache()
    if not args.skip_served:
        try:
            served, served_notes = run_served(folder, work, args.size, args.steps, args.repeats, vae_fp16,
                                              args.served_fallback, args.ready_timeout)
        except Exception as exc:
            log.exception("served path failed")
            served, served_notes = PathResult("served", error=f"{type(exc).__name__}: {exc}"), []
        results.append(served)
        notes.extend(served_notes)
        log.info("served: %s s/image (median), %s it/s%s", _num(served.s_image, ".3f"), _num(served.it_s, ".2f"),
                 f"; failed: {served.error.splitlines()[0]}" if served.error else "")

    ref = reference if reference is not None and reference.seconds else None
    lines = [
        f"## SDXL base on GPU: diffusers vs served ({args.size}×{args.size}, {args.steps} steps)", "",
        markdown_table(results, ref), "",
        f"Median of {args.repeats} timed run(s) after one warm-up; batch 1, euler + karras, guidance {GUIDANCE} "
        f"(CFG as one UNet batch of 2), seed {SEED}, sharpness 0, no styles, previews off. Full-size SDXL base "
        f"architecture with seeded random weights (export/configs/sdxl_base, init seed {INIT_SEED}), fp16; VAE "
        f"decode in {args.vae} on both paths"
        + (" (diffusers: force_upcast; served: vae_decoder dtype float32)." if not vae_fp16 else "."),
        ("s/image: diffusers, the pipeline call between CUDA synchronisations; served, the synchronous "
         "POST /v1/generation/text-to-image (text encoders, sampling, VAE, PNG file, job store). it/s: diffusers, "
         "(steps−1) over the time between the first and last step-end callbacks; served, 1 / mean "
         "fooocus_step_seconds (the frontend's time between consecutive step events)."),
    ]
    for r in results:
        if r.error:
            lines.append(f"**{r.name} failed:** {r.error}")
    for r in results:
        if r.seconds and math.isfinite(r.it_s) and args.size == 1024:
            lines.append(f"{r.name.split(':')[0]}: {r.it_s:.2f} it/s ≈ {UNET_TFLOP_PER_CFG_STEP_1024 * r.it_s:.0f} "
                         f"TFLOP/s in the UNet ({UNET_TFLOP_PER_CFG_STEP_1024} TFLOP per CFG step at 1024²).")
    if args.size == 1024 and args.steps == 30:
        lines.append(f"Context: {ANCHORS_H100}.")
    lines += ["", f"GPU: {gpu}. Software: {versions()}.", f"Command: `{command}`"]
    if notes:
        lines += ["", "Notes:"] + ["- " + n.replace("\n", "\n  ") for n in notes]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0 if all(r.seconds for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
