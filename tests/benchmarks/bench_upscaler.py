"""Upscaler benchmark: the `upscaler` leaf (Real-ESRGAN x4plus, 16.7 M parameters) through
pipeline/upscale.py's Fooocus tiling, on ONNX Runtime (the exported ONNX, what the python-ort and
onnxruntime targets run) and on torch (the same converted weights, what the python-torch target
runs), side by side in one run on the CPU. Not a pytest test; run from the repository root:

    .venv/bin/python -m tests.benchmarks.bench_upscaler [--size 256x192] [--tile 512] [--repeats 3]

Input: bear.jpg from the shared fixtures, resized to --size. Per runtime: one untimed warm-up,
then N timed runs of `upscale_image` (same image, same tiles); reports the median seconds and
seconds per megapixel of input, as a Markdown row.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import sys
from pathlib import Path

from .bench_text_to_image import cpu_description, timed

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("bench")


class TorchModels:
    """A ModelRunner over the torch module (what the python-torch target's leaf does, here fp32 on CPU)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, model, inputs):
        import torch

        with torch.inference_mode():
            return {"upscaled": self.module(inputs["image"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_upscaler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256x192", help="input WIDTHxHEIGHT (default 256x192)")
    parser.add_argument("--tile", type=int, default=512, help="tile size in input pixels (default 512, Fooocus's)")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap (default 32, Fooocus's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per runtime (default 3)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    command = shlex.join([".venv/bin/python", "-m", "tests.benchmarks.bench_upscaler",
                          *(sys.argv[1:] if argv is None else argv)])

    import numpy as np
    import torch
    from PIL import Image

    from export.__main__ import build_default
    from export.realesrgan import upscaler_module
    from pipeline.models import OnnxRuntimeModels
    from pipeline.image_tasks import tile_starts
    from pipeline.upscale import upscale_image
    from tests.conftest import FIXTURE_IMAGES

    torch.set_num_threads(os.cpu_count() or 1)
    build_default()
    onnx_dir = max((ROOT / "build" / "onnx").glob("tiny-sdxl-*"))
    image = np.asarray(Image.open(FIXTURE_IMAGES / "bear.jpg").convert("RGB").resize((width, height), Image.LANCZOS))
    tiles = len(tile_starts(height, args.tile, args.overlap)) * len(tile_starts(width, args.tile, args.overlap))
    runners = {"onnxruntime": OnnxRuntimeModels(onnx_dir), "torch": TorchModels(upscaler_module())}
    outputs, seconds = {}, {}
    for name, runner in runners.items():
        def run(name=name, runner=runner):
            outputs[name] = upscale_image(runner, image, args.tile, args.overlap)

        times = timed(run, args.repeats)
        seconds[name] = statistics.median(times)
        log.info("%-11s %s s (median %.2f)", name, " ".join(f"{t:.2f}" for t in times), seconds[name])
    diff = np.abs(outputs["onnxruntime"].astype(int) - outputs["torch"].astype(int)).max()
    mp = width * height / 1e6
    ort, pt = seconds["onnxruntime"] / mp, seconds["torch"] / mp
    print("| upscaler input | tiles | ONNX Runtime s/MP | torch s/MP | torch / ORT |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {width}*{height} ({mp:.3f} MP) | {tiles} x {args.tile} px | {ort:.0f} | {pt:.0f} | {pt / ort:.2f}x |")
    print(f"\nMedian of {args.repeats} after one warm-up, batch 1 per tile, fp32; outputs differ by at most "
          f"{diff} grey level(s).\nMachine: {cpu_description()}; torch threads {torch.get_num_threads()}, "
          f"ORT threads default.\nCommand: `{command}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
