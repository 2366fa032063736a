"""Text-to-image benchmark: the generation core in process (ONNX Runtime), the same request served
(HTTP -> frontend -> Triton -> PNG) and diffusers' StableDiffusionXLPipeline in torch on CPU, on the
embedded tiny SDXL checkpoint. Not a pytest test; run from the repository root:

    .venv/bin/python -m tests.benchmarks.bench_text_to_image [--repeats N] [--out FILE]

Per case: one untimed warm-up run of each path, then N timed runs; reports the median seconds per
image and the ratios served / in-process and diffusers / in-process. All paths use euler with
karras sigmas, guidance 4.0 (CFG batch 2), one image, a fixed seed.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import argparse
import logging
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = ((256, 256, 8), (512, 512, 30), (1152, 896, 30))  # (width, height, steps); the last: Fooocus's default
PROMPT = "a photograph of a cat sitting on a red sofa"
SEED = 1234
GUIDANCE = 4.0

log = logging.getLogger("bench")


def cpu_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    extra = f", {usable} usable by this process" if usable != cores else ""
    return f"{model}, {cores} cores{extra}"


def request_body(width: int, height: int, steps: int) -> dict:
    """The same computation diffusers does: no styles, no sharpness filter, no ADM scaling, no
    previews (Fooocus's extras cost time diffusers does not spend; the default request is below)."""
    return {"prompt": PROMPT, "aspect_ratios_selection": f"{width}*{height}", "image_seed": SEED,
            "guidance_scale": GUIDANCE, "sharpness": 0.0, "style_selections": [],
            "advanced_params": {"sampler_name": "euler", "overwrite_step": steps, "disable_preview": True,
                                "adm_scaler_positive": 1.0, "adm_scaler_negative": 1.0}}


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up, not timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


class InProcess:
    """The generation core over in-process ONNX Runtime sessions (ORT threads left at default)."""

    def __init__(self, repo: Path, onnx_dir: Path):
        from pipeline.generate import Pipeline
        from pipeline.models import OnnxRuntimeModels

        self.pipeline = Pipeline.from_dir(repo / "fooocus_pipeline" / "1", OnnxRuntimeModels(onnx_dir))

    def __call__(self, width: int, height: int, steps: int):
        from pipeline.task import GenerationTask

        images = []

        def emit(event, image):
            if event["type"] == "result":
                images.append(image)

        self.pipeline.run(GenerationTask.from_dict(request_body(width, height, steps)), emit)
        assert len(images) == 1 and images[0].shape == (height, width, 3), [i.shape for i in images]
        return images[0]


class Served:
    """POST /v1/generation/text-to-image (sync) until the JSON list comes back."""

    def __init__(self, frontend):
        self.frontend = frontend

    def __call__(self, width: int, height: int, steps: int):
        r = self.frontend.client.post("/v1/generation/text-to-image", json=request_body(width, height, steps))
        if r.status_code != 200:
            raise RuntimeError(f"served request failed: {r.status_code} {r.text}")
        results = r.json()
        if len(results) != 1 or results[0]["finish_reason"] != "SUCCESS":
            raise RuntimeError(f"served request did not succeed: {results}")
        return results


class Diffusers:
    """diffusers' StableDiffusionXLPipeline on the same tiny checkpoint, torch on CPU."""

    def __init__(self, checkpoint: Path):
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        for lib in (diffusers_logging, transformers_logging):
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        self.pipe = StableDiffusionXLPipeline.from_pretrained(str(checkpoint), local_files_only=True)
        self.pipe.scheduler = EulerDiscreteScheduler.from_config(self.pipe.scheduler.config, use_karras_sigmas=True)
        self.pipe.to("cpu")
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, width: int, height: int, steps: int):
        import torch

        generator = torch.Generator("cpu").manual_seed(SEED)
        with torch.inference_mode():
            out = self.pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=height, width=width,
                            output_type="pil", generator=generator)
        image = out.images[0]
        assert image.size == (width, height), image.size
        return image


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| size | steps | in-process s | served s | diffusers s | served / in-process | diffusers / in-process |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['width']}*{r['height']} | {r['steps']} | {r['inproc']:.3f} | {r['served']:.3f} | "
                     f"{r['diffusers']:.3f} | {fmt_ratio(r['served'], r['inproc'])} | "
                     f"{fmt_ratio(r['diffusers'], r['inproc'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_text_to_image",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path and case (default 3)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("onnx_ir", "httpx", "diffusers", "transformers", "frontend", "pipeline"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = shlex.join([".venv/bin/python", "-m", "tests.benchmarks.bench_text_to_image",
                          *(sys.argv[1:] if argv is None else argv)])

    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # the torch path (and the core's small torch ops)

    from export.__main__ import build_default
    from tests.conftest import served_frontend, start_triton

    repo = build_default()
    onnx_dirs = sorted((ROOT / "build" / "onnx").glob("tiny-sdxl-*"))
    if not onnx_dirs:
        raise SystemExit("build_default() did not write build/onnx/tiny-sdxl-*")
    onnx_dir = onnx_dirs[-1]
    checkpoint = ROOT / "build" / "checkpoints" / onnx_dir.name
    if not (checkpoint / "model_index.json").exists():
        raise SystemExit(f"tiny diffusers checkpoint missing: {checkpoint}")

    inproc = InProcess(repo, onnx_dir)
    diffusers = Diffusers(checkpoint)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-t2i-") as tmp:
        tmp = Path(tmp)
        log.info("starting Triton ...")
        triton = start_triton(repo, tmp / "triton")
        try:
            with served_frontend(triton.grpc_url, tmp / "outputs") as frontend:
                served = Served(frontend)
                for width, height, steps in CASES:
                    row = {"width": width, "height": height, "steps": steps}
                    for key, path in (("inproc", inproc), ("served", served), ("diffusers", diffusers)):
                        times = timed(lambda: path(width, height, steps), args.repeats)
                        row[key] = statistics.median(times)
                        log.info("%d*%d, %d steps, %-9s: %s s (median %.3f)", width, height, steps, key,
                                 " ".join(f"{t:.3f}" for t in times), row[key])
                    rows.append(row)
        finally:
            triton.stop()

    report = "\n".join([
        markdown_table(rows), "",
        f"Median seconds per image over {args.repeats} timed run(s) after one warm-up, batch 1, euler + karras, "
        f"guidance {GUIDANCE} (CFG batch 2), seed {SEED}; tiny SDXL checkpoint `{onnx_dir.name}`.",
        f"Machine: {cpu_description()}; torch threads {torch.get_num_threads()}, ORT threads default.",
        f"Command: `{command}`",
    ])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
