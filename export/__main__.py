"""python -m export COMMAND ...

  default     build (once, cached) the embedded default: the tiny seeded SDXL checkpoint, its ONNX
              files and the python-ort model repository (used by `make run` and the tests)
  onnx        export a checkpoint (diffusers folder or single-file .safetensors) to ONNX
  repository  write a model repository for a target from exported ONNX files
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUILD = ROOT / "build"
# Files whose content decides the tiny checkpoint and its ONNX export.
_EXPORT_SOURCES = ("export/tiny.py", "export/onnx_export.py", "export/checkpoint.py", "export/tokenizer.py",
                   "pipeline/torch_leaves.py",
                   "pipeline/interfaces.py", "constraints.txt")

log = logging.getLogger("export")


def _sources_digest() -> str:
    h = hashlib.sha256()
    for rel in _EXPORT_SOURCES:
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def export_checkpoint(checkpoint: Path, onnx_dir: Path) -> Path:
    """ONNX files + tokenizer.json + dims.json for a checkpoint into onnx_dir."""
    from .checkpoint import load_checkpoint, model_dims
    from .onnx_export import export_onnx
    from .tokenizer import sdxl_tokenizers

    components = load_checkpoint(checkpoint)
    dims = model_dims(components)
    onnx_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=onnx_dir.parent, prefix=".onnx-"))
    try:
        export_onnx(components, dims, tmp)
        tok, _ = sdxl_tokenizers(tmp / "vocab")
        tok.save_pretrained(tmp / "tokenizer")
        shutil.copy2(tmp / "tokenizer" / "tokenizer.json", tmp / "tokenizer.json")
        shutil.rmtree(tmp / "tokenizer")
        shutil.rmtree(tmp / "vocab")
        (tmp / "dims.json").write_text(json.dumps({"checkpoint": components.name, "dims": dims.to_json()}, indent=2))
        if onnx_dir.exists():
            shutil.rmtree(onnx_dir)
        tmp.rename(onnx_dir)  # atomic: a cache hit never sees a half-written export
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return onnx_dir


def write_repository_from_onnx(onnx_dir: Path, repo: Path, target: str, device: str = "cpu",
                               styles_dir: Path | None = None, wildcards_dir: Path | None = None) -> Path:
    from pipeline.interfaces import ModelDims, leaf_specs

    from .repository import write_repository

    meta = json.loads((onnx_dir / "dims.json").read_text())
    dims = ModelDims.from_json(meta["dims"])
    if repo.exists():
        shutil.rmtree(repo)
    return write_repository(repo, {n: onnx_dir / f"{n}.onnx" for n in leaf_specs(dims)},
                            dims, onnx_dir / "tokenizer.json",
                            target=target, checkpoint_name=meta["checkpoint"], device=device,
                            styles_dir=styles_dir, wildcards_dir=wildcards_dir)


def write_torch_repository(checkpoint: Path, repo: Path, device: str, work: Path = DEFAULT_BUILD) -> Path:
    """A python-torch repository serving `checkpoint` directly (converted to a diffusers folder
    first when it is a single file)."""
    from .checkpoint import load_checkpoint, model_dims
    from .repository import write_repository
    from .tokenizer import sdxl_tokenizers

    components = load_checkpoint(checkpoint)
    folder = checkpoint
    if not checkpoint.is_dir():
        folder = work / "checkpoints" / checkpoint.stem
        from diffusers import StableDiffusionXLPipeline

        tok, tok2 = sdxl_tokenizers(work / "vocab")
        StableDiffusionXLPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                  text_encoder_2=components.text_encoder_2, tokenizer=tok, tokenizer_2=tok2,
                                  unet=components.unet, scheduler=None).save_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tok, _ = sdxl_tokenizers(Path(tmp) / "vocab")
        tok.save_pretrained(Path(tmp) / "tokenizer")
        if repo.exists():
            shutil.rmtree(repo)
        return write_repository(repo, None, model_dims(components), Path(tmp) / "tokenizer" / "tokenizer.json",
                                target="python-torch", checkpoint_name=checkpoint.name, device=device,
                                checkpoint_dir=folder)


def build_default(build: Path = DEFAULT_BUILD) -> Path:
    """The embedded default repository, rebuilding the tiny checkpoint and ONNX only when the
    export code changed. Returns the repository path."""
    from .tiny import save_tiny_sdxl

    build.mkdir(parents=True, exist_ok=True)
    digest = _sources_digest()
    onnx_dir = build / "onnx" / f"tiny-sdxl-{digest}"
    if not (onnx_dir / "dims.json").exists():
        log.info("building the tiny SDXL checkpoint and its ONNX export (about a minute) ...")
        checkpoint = build / "checkpoints" / f"tiny-sdxl-{digest}"
        if checkpoint.exists():
            shutil.rmtree(checkpoint)
        save_tiny_sdxl(checkpoint)
        export_checkpoint(checkpoint, onnx_dir)
        for old in (build / "onnx").glob("tiny-sdxl-*"):
            if old != onnx_dir:
                shutil.rmtree(old, ignore_errors=True)
    repo = build / "model_repository"
    stamp = _repository_digest(onnx_dir)
    stamp_file = build / "model_repository.stamp"
    if not stamp_file.exists() or stamp_file.read_text() != stamp or not repo.exists():
        write_repository_from_onnx(onnx_dir, repo, "python-ort")
        stamp_file.write_text(stamp)
    log.info("model repository: %s", repo)
    return repo


def _repository_digest(onnx_dir: Path) -> str:
    """What the written repository depends on besides the ONNX files: a repository in use by a
    running Triton is only rewritten when one of these changed."""
    h = hashlib.sha256(onnx_dir.name.encode())
    for path in sorted([*(ROOT / "model_repository").rglob("*.py"), ROOT / "export" / "repository.py",
                        ROOT / "export" / "__main__.py"]):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("default", help="build the embedded default (cached)")
    p.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD)
    p = sub.add_parser("onnx", help="export a checkpoint to ONNX")
    p.add_argument("checkpoint", type=Path, help="diffusers folder or single-file .safetensors")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("repository", help="write a model repository (from ONNX files, or a checkpoint for python-torch)")
    p.add_argument("--onnx", type=Path, help="exported ONNX folder (python-ort, onnxruntime, tensorrt)")
    p.add_argument("--checkpoint", type=Path, help="SDXL checkpoint (python-torch)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--target", default="python-ort", choices=("python-ort", "onnxruntime", "tensorrt", "python-torch"))
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="onnxruntime target: where it runs")
    p.add_argument("--styles-dir", type=Path, help="Fooocus-format style files (e.g. Fooocus's sdxl_styles/)")
    p.add_argument("--wildcards-dir", type=Path, help="wildcard files (name.txt, one option per line)")
    p = sub.add_parser("tensorrt", help="build the TensorRT plans of a tensorrt repository (needs TensorRT and a GPU)")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--timing-cache", type=Path, default=DEFAULT_BUILD / "trt_timing.cache")
    args = parser.parse_args(argv)
    if args.command == "default":
        print(build_default(args.build_dir))
    elif args.command == "onnx":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        print(export_checkpoint(args.checkpoint, args.out))
    elif args.command == "repository":
        if args.target == "python-torch":
            if not args.checkpoint:
                parser.error("--target python-torch needs --checkpoint")
            print(write_torch_repository(args.checkpoint, args.out, args.device))
        else:
            if not args.onnx:
                parser.error(f"--target {args.target} needs --onnx")
            print(write_repository_from_onnx(args.onnx, args.out, args.target, args.device,
                                             args.styles_dir, args.wildcards_dir))
    elif args.command == "tensorrt":
        from .tensorrt import TensorRTUnavailable, build_repository_engines

        try:
            build_repository_engines(args.repository, args.timing_cache)
        except TensorRTUnavailable as exc:
            log.error("%s", exc)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
