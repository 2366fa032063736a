"""python -m export COMMAND ...

  default     build (once, cached) the embedded default: the tiny seeded SDXL checkpoint, its ONNX
              files and the python-ort model repository (used by `make run` and the tests)
  onnx        export a checkpoint (diffusers folder or single-file .safetensors) to ONNX
  expansion   add a prompt-expansion GPT-2 folder (Fooocus's fooocus_expansion) to an ONNX export
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
                   "export/realesrgan.py", "export/expansion.py", "pipeline/torch_leaves.py", "pipeline/freeu.py",
                   "export/tiny_patches.py", "pipeline/interfaces.py", "constraints.txt")

log = logging.getLogger("export")


def _sources_digest() -> str:
    h = hashlib.sha256()
    for rel in _EXPORT_SOURCES:
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def write_clip_tokenizer(out_dir: Path) -> Path:
    """CLIP's tokenizer as `<out_dir>/tokenizer.json` (the pipeline's text tokenizer)."""
    from .tokenizer import sdxl_tokenizers

    with tempfile.TemporaryDirectory() as tmp:
        tok, _ = sdxl_tokenizers(Path(tmp) / "vocab")
        tok.save_pretrained(Path(tmp) / "tokenizer")
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(tmp) / "tokenizer" / "tokenizer.json", out_dir / "tokenizer.json")
    return out_dir / "tokenizer.json"


def export_checkpoint(checkpoint: Path, onnx_dir: Path, expansion: Path | None = None) -> Path:
    """ONNX files + tokenizer.json + dims.json for a checkpoint into onnx_dir; with an expansion
    model (`expansion`, or a diffusers folder's prompt_expansion/) also its tokenizer and words
    (export.expansion), checked before the ONNX export."""
    from .checkpoint import load_checkpoint, model_dims
    from .expansion import write_expansion_files
    from .onnx_export import export_onnx

    components = load_checkpoint(checkpoint, expansion=expansion)
    dims = model_dims(components)
    onnx_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=onnx_dir.parent, prefix=".onnx-"))
    try:
        tokenizer_json = write_clip_tokenizer(tmp)
        if components.expansion is not None:
            write_expansion_files(components.expansion_dir, int(dims.expansion_vocab), tmp, tokenizer_json)
        export_onnx(components, dims, tmp)
        (tmp / "dims.json").write_text(json.dumps({"checkpoint": components.name, "dims": dims.to_json()}, indent=2))
        if onnx_dir.exists():
            shutil.rmtree(onnx_dir)
        tmp.rename(onnx_dir)  # atomic: a cache hit never sees a half-written export
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return onnx_dir


def expansion_files(folder: Path, dims, tokenizer_json: Path, words: Path | None = None) -> dict:
    """write_repository's expansion arguments from an export folder: its expansion_tokenizer.json
    and expansion_words.txt, `words` (checked against the tokenizer) replacing the latter."""
    from pipeline.interfaces import PROMPT_EXPANSION, leaf_specs

    from .expansion import TOKENIZER_FILE, WORDS_FILE, ExpansionMismatch, check_words

    files = {"expansion_tokenizer": folder / TOKENIZER_FILE, "expansion_words": folder / WORDS_FILE}
    files = {k: v for k, v in files.items() if v.exists()}
    if words is not None:
        if PROMPT_EXPANSION not in leaf_specs(dims):
            raise ExpansionMismatch(f"--expansion-words {words}: this export has no prompt-expansion model")
        check_words(words, files.get("expansion_tokenizer", tokenizer_json), int(dims.expansion_vocab))
        files["expansion_words"] = words
    return files


def write_repository_from_onnx(onnx_dir: Path, repo: Path, target: str, device: str = "cpu",
                               styles_dir: Path | None = None, wildcards_dir: Path | None = None,
                               loras_dir: Path | None = None, expansion_words: Path | None = None,
                               refiners: dict[str, Path] | None = None, inpaint_dir: Path | None = None,
                               batch_delay_us: int | None = None) -> Path:
    """`expansion_words`: the expansion's allowed words (one per line), instead of the export's.
    `refiners`: {checkpoint file name: its ONNX folder (`python -m export onnx`)}, whose UNets
    become refiner leaves. `inpaint_dir`: Fooocus's inpaint engine files. `batch_delay_us`: the
    leaves' dynamic-batcher queue delay (default: the target's, `export.repository.BATCH_DELAY_US`)."""
    from pipeline.interfaces import ModelDims, leaf_specs

    from .repository import write_repository

    meta = json.loads((onnx_dir / "dims.json").read_text())
    dims = ModelDims.from_json(meta["dims"])
    expansion = expansion_files(onnx_dir, dims, onnx_dir / "tokenizer.json", expansion_words)
    refiner_unets = {}
    for file_name, folder in (refiners or {}).items():
        other = ModelDims.from_json(json.loads((Path(folder) / "dims.json").read_text())["dims"])
        if (other.context_dim, other.pooled_dim, other.latent_channels) != (dims.context_dim, dims.pooled_dim,
                                                                            dims.latent_channels):
            raise ValueError(f"refiner {file_name}: its UNet does not take the base's conditioning (an SDXL "
                             f"refiner or SD1.5 model); only SDXL-base-type refiners are served")
        refiner_unets[file_name] = Path(folder) / "unet.onnx"
    if repo.exists():
        shutil.rmtree(repo)
    return write_repository(repo, {n: onnx_dir / f"{n}.onnx" for n in leaf_specs(dims)},
                            dims, onnx_dir / "tokenizer.json",
                            target=target, checkpoint_name=meta["checkpoint"], device=device,
                            styles_dir=styles_dir, wildcards_dir=wildcards_dir, loras_dir=loras_dir,
                            refiners=refiner_unets, inpaint_dir=inpaint_dir, batch_delay_us=batch_delay_us,
                            **expansion)


def write_torch_repository(checkpoint: Path, repo: Path, device: str, work: Path = DEFAULT_BUILD,
                           loras_dir: Path | None = None, expansion: Path | None = None,
                           expansion_words: Path | None = None, batch_delay_us: int | None = None) -> Path:
    """A python-torch repository serving `checkpoint` directly (converted to a diffusers folder
    first when it is a single file); `expansion` as in export_checkpoint."""
    from .checkpoint import EXPANSION_DIR, load_checkpoint, model_dims
    from .expansion import write_expansion_files
    from .repository import write_repository
    from .tokenizer import sdxl_tokenizers

    components = load_checkpoint(checkpoint, expansion=expansion)
    dims = model_dims(components)
    folder = checkpoint
    if not checkpoint.is_dir():
        folder = work / "checkpoints" / checkpoint.stem
        from diffusers import StableDiffusionXLPipeline

        tok, tok2 = sdxl_tokenizers(work / "vocab")
        StableDiffusionXLPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                  text_encoder_2=components.text_encoder_2, tokenizer=tok, tokenizer_2=tok2,
                                  unet=components.unet, scheduler=None).save_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_json = write_clip_tokenizer(Path(tmp))
        expansion_model = None
        if components.expansion is not None:
            write_expansion_files(components.expansion_dir, int(dims.expansion_vocab), Path(tmp), tokenizer_json)
            if components.expansion_dir.resolve() != (Path(folder) / EXPANSION_DIR).resolve():
                expansion_model = components.expansion_dir  # the leaf gets a copy
        files = expansion_files(Path(tmp), dims, tokenizer_json, expansion_words)
        if repo.exists():
            shutil.rmtree(repo)
        return write_repository(repo, None, dims, tokenizer_json, target="python-torch",
                                checkpoint_name=checkpoint.name, device=device, checkpoint_dir=folder,
                                loras_dir=loras_dir, expansion_model=expansion_model,
                                batch_delay_us=batch_delay_us, **files)


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
    refiner_dir, inpaint_dir = onnx_dir / "refiner", onnx_dir / "inpaint"
    if not (refiner_dir / "dims.json").exists() or not (inpaint_dir / "inpaint_v26.fooocus.patch").exists():
        _build_tiny_extras(build / "checkpoints" / f"tiny-sdxl-{digest}", refiner_dir, inpaint_dir)
    repo = build / "model_repository"
    stamp = _repository_digest(onnx_dir)
    stamp_file = build / "model_repository.stamp"
    if not stamp_file.exists() or stamp_file.read_text() != stamp or not repo.exists():
        write_repository_from_onnx(onnx_dir, repo, "python-ort", refiners={TINY_REFINER_NAME: refiner_dir},
                                   inpaint_dir=inpaint_dir)
        stamp_file.write_text(stamp)
    log.info("model repository: %s", repo)
    return repo


TINY_REFINER_NAME = "tiny-sdxl-refiner.safetensors"


def _build_tiny_extras(checkpoint: Path, refiner_dir: Path, inpaint_dir: Path) -> None:
    """The embedded default's second checkpoint (a refiner: the tiny SDXL with other seeds, UNet
    only) and tiny seeded inpaint engine files (head + the v1/v2.5/v2.6 patches)."""
    from pipeline.interfaces import UNET

    from .checkpoint import load_checkpoint, model_dims
    from .onnx_export import export_onnx
    from .tiny import TINY_SEED, build_tiny_sdxl
    from .tiny_patches import save_fooocus_patch, save_inpaint_head

    if not checkpoint.exists():
        from .tiny import save_tiny_sdxl

        save_tiny_sdxl(checkpoint)
    with tempfile.TemporaryDirectory(dir=refiner_dir.parent) as tmp:
        build_tiny_sdxl(TINY_SEED + 100).save_pretrained(Path(tmp) / "ckpt")
        components = load_checkpoint(Path(tmp) / "ckpt")
        dims = model_dims(components)
        out = Path(tmp) / "refiner"
        export_onnx(components, dims, out, names=[UNET])
        (out / "dims.json").write_text(json.dumps({"checkpoint": TINY_REFINER_NAME, "dims": dims.to_json()}))
        shutil.rmtree(refiner_dir, ignore_errors=True)
        out.rename(refiner_dir)
    inpaint_dir.mkdir(parents=True, exist_ok=True)
    save_inpaint_head(inpaint_dir / "fooocus_inpaint_head.pth", checkpoint)
    for seed, name in enumerate(("inpaint.fooocus.patch", "inpaint_v25.fooocus.patch", "inpaint_v26.fooocus.patch")):
        save_fooocus_patch(inpaint_dir / name, checkpoint, seed=10 + seed)


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
    expansion_help = ("prompt-expansion GPT-2 folder (Fooocus's models/prompt_expansion/fooocus_expansion: weights, "
                      "tokenizer, positive.txt); default: the diffusers folder's prompt_expansion/")
    p = sub.add_parser("onnx", help="export a checkpoint to ONNX")
    p.add_argument("checkpoint", type=Path, help="diffusers folder or single-file .safetensors")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--expansion", type=Path, help=expansion_help)
    p = sub.add_parser("expansion", help="add (or replace) the prompt expansion of an ONNX export")
    p.add_argument("folder", type=Path, help="prompt-expansion GPT-2 folder (e.g. Fooocus's fooocus_expansion)")
    p.add_argument("--onnx", type=Path, required=True, help="the ONNX folder `python -m export onnx` wrote")
    p = sub.add_parser("repository", help="write a model repository (from ONNX files, or a checkpoint for python-torch)")
    p.add_argument("--onnx", type=Path, help="exported ONNX folder (python-ort, onnxruntime, tensorrt)")
    p.add_argument("--checkpoint", type=Path, help="SDXL checkpoint (python-torch)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--target", default="python-ort", choices=("python-ort", "onnxruntime", "tensorrt", "python-torch"))
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="onnxruntime target: where it runs")
    p.add_argument("--styles-dir", type=Path, help="Fooocus-format style files (e.g. Fooocus's sdxl_styles/)")
    p.add_argument("--wildcards-dir", type=Path, help="wildcard files (name.txt, one option per line)")
    p.add_argument("--loras-dir", type=Path, help="LoRA files (Fooocus's models/loras; default: FOOOCUS_LORAS_DIR, "
                                                  "else models/loras under the project root)")
    p.add_argument("--expansion-words", type=Path, help="Fooocus V2's allowed words, one per line (e.g. Fooocus's "
                                                        "positive.txt), copied as expansion_words.txt")
    p.add_argument("--expansion", type=Path, help=expansion_help + " (python-torch)")
    p.add_argument("--refiner", action="append", default=[], metavar="NAME=ONNX_DIR",
                   help="serve another checkpoint's UNet as the refiner NAME (its file name, as requests send it); "
                        "ONNX_DIR from `python -m export onnx`; repeatable")
    p.add_argument("--inpaint-dir", type=Path, help="Fooocus's inpaint engine files (fooocus_inpaint_head.pth, "
                                                    "inpaint_v26.fooocus.patch, ...; Fooocus's models/inpaint)")
    p.add_argument("--batch-delay-us", type=int, metavar="US",
                   help="leaves' dynamic batcher: how long a request waits for other jobs' requests to batch with "
                        "(max_queue_delay_microseconds; 0 = never wait; default: the target's, see docs/production.md)")
    p = sub.add_parser("tensorrt", help="build the TensorRT plans of a tensorrt repository (needs TensorRT and a GPU)")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--timing-cache", type=Path, default=DEFAULT_BUILD / "trt_timing.cache")
    args = parser.parse_args(argv)
    from .expansion import ExpansionMismatch

    try:
        return _run(parser, args)
    except ExpansionMismatch as exc:  # a clear message, not a traceback (nor a silently disabled expansion)
        log.error("%s", exc)
        return 2


def _run(parser, args) -> int:
    if args.command == "default":
        print(build_default(args.build_dir))
    elif args.command == "onnx":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        print(export_checkpoint(args.checkpoint, args.out, expansion=args.expansion))
    elif args.command == "expansion":
        from .expansion import export_expansion

        print(export_expansion(args.folder, args.onnx))
    elif args.command == "repository":
        if args.target == "python-torch":
            if not args.checkpoint:
                parser.error("--target python-torch needs --checkpoint")
            print(write_torch_repository(args.checkpoint, args.out, args.device, loras_dir=args.loras_dir,
                                         expansion=args.expansion, expansion_words=args.expansion_words,
                                         batch_delay_us=args.batch_delay_us))
        else:
            if not args.onnx:
                parser.error(f"--target {args.target} needs --onnx")
            if args.expansion:
                parser.error("--expansion is for --target python-torch: add it to the ONNX export with "
                             "`python -m export expansion FOLDER --onnx DIR`")
            refiners = {}
            for item in args.refiner:
                name, sep, folder = item.partition("=")
                if not sep or not name or not folder:
                    parser.error(f"--refiner takes NAME=ONNX_DIR, got {item!r}")
                refiners[name] = Path(folder)
            print(write_repository_from_onnx(args.onnx, args.out, args.target, args.device,
                                             args.styles_dir, args.wildcards_dir, args.loras_dir,
                                             args.expansion_words, refiners=refiners, inpaint_dir=args.inpaint_dir,
                                             batch_delay_us=args.batch_delay_us))
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
