"""Fooocus V2's expansion folder -> the files the pipeline reads beside `model_info.json`.

A prompt-expansion folder is a transformers GPT-2 folder, e.g. Fooocus's
`models/prompt_expansion/fooocus_expansion/`: config.json and the weights (`pytorch_model.bin`),
its tokenizer (tokenizer.json, or vocab.json + merges.txt, plus tokenizer_config.json and
special_tokens_map.json) and `positive.txt`, the allowed words. The export writes

  expansion_tokenizer.json  the tokenizer as a `tokenizers` JSON (`pipeline.expansion.ExpansionTokenizer`)
  expansion_words.txt       positive.txt, as it is

into the ONNX folder, and the repository writer copies both into the pipeline model's version
folder. A folder without a tokenizer keeps CLIP's (`tokenizer.json`; the tiny default's GPT-2 is on
CLIP's vocabulary). Whatever tokenizer it gets, its vocabulary must be the model's: anything else
fails the export (`ExpansionMismatch`) instead of serving a pipeline without the expansion.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

TOKENIZER_FILE = "expansion_tokenizer.json"
WORDS_FILE = "expansion_words.txt"
FOOOCUS_WORDS = "positive.txt"  # Fooocus's name for the allowed words

log = logging.getLogger(__name__)


class ExpansionMismatch(ValueError):
    """The expansion model, its tokenizer and its words do not fit together."""


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer as a `tokenizers.Tokenizer`, or None when it has none: its
    tokenizer.json (read by the `tokenizers` library), else vocab.json + merges.txt (GPT-2's
    byte-level BPE, read by transformers' GPT2TokenizerFast)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        from transformers import GPT2TokenizerFast

        return GPT2TokenizerFast.from_pretrained(str(folder), local_files_only=True).backend_tokenizer
    return None


def check_vocabulary(tokenizer_json: Path, model_vocab: int, what: str) -> None:
    """`what` names the tokenizer in the error."""
    from pipeline.expansion import ExpansionTokenizer

    size = ExpansionTokenizer(tokenizer_json).vocab_size
    if size != model_vocab:
        raise ExpansionMismatch(
            f"the prompt-expansion model has a {model_vocab}-token vocabulary but {what} has {size} tokens: "
            "the expansion would not run. Put the model's own tokenizer (tokenizer.json, or vocab.json + "
            "merges.txt, e.g. Fooocus's models/prompt_expansion/fooocus_expansion) beside its weights")


def check_words(words_file: Path, tokenizer_json: Path, model_vocab: int) -> int:
    """The number of allowed words that are single tokens (the only ones the expansion can use);
    none at all is an error."""
    from pipeline.expansion import ExpansionTokenizer, read_words

    words = read_words(words_file)
    tokenizer = ExpansionTokenizer(tokenizer_json)
    usable = sum(1 for t in map(tokenizer.word_token, words) if t is not None and t < model_vocab)
    if words and usable == 0:
        raise ExpansionMismatch(f"{words_file}: none of its {len(words)} words is a single token of the "
                                "expansion model's tokenizer")
    if usable < len(words):
        log.warning("%s: %d of %d words are not single tokens of the expansion's tokenizer and are skipped",
                    words_file, len(words) - usable, len(words))
    return usable


def write_expansion_files(expansion_dir: str | Path | None, model_vocab: int, out_dir: Path,
                          clip_tokenizer_json: Path) -> list[Path]:
    """Write `expansion_tokenizer.json` (when the folder has a tokenizer) and `expansion_words.txt`
    (when it has positive.txt) into out_dir after checking them against the model's vocabulary;
    without a tokenizer the pipeline uses CLIP's, which must then fit. Returns the files written."""
    written = []
    folder = Path(expansion_dir) if expansion_dir is not None else None
    tokenizer = load_tokenizer(folder) if folder is not None else None
    if tokenizer is not None:
        tokenizer_json = out_dir / TOKENIZER_FILE
        tokenizer.save(str(tokenizer_json))
        check_vocabulary(tokenizer_json, model_vocab, f"the tokenizer in {folder}")
        written.append(tokenizer_json)
    else:
        tokenizer_json = clip_tokenizer_json
        check_vocabulary(tokenizer_json, model_vocab,
                         f"CLIP's tokenizer ({folder or 'the expansion model'} has no tokenizer.json, "
                         "nor vocab.json + merges.txt)")
    if folder is not None and (folder / FOOOCUS_WORDS).exists():
        check_words(folder / FOOOCUS_WORDS, tokenizer_json, model_vocab)
        shutil.copyfile(folder / FOOOCUS_WORDS, out_dir / WORDS_FILE)
        written.append(out_dir / WORDS_FILE)
    return written


def expansion_dims(gpt2) -> dict:
    """What `ModelDims.extra` records of the expansion model (see export.checkpoint.model_dims)."""
    return {"expansion_vocab": int(gpt2.config.vocab_size), "expansion_positions": int(gpt2.config.n_positions)}


def export_expansion(expansion_dir: str | Path, onnx_dir: Path) -> Path:
    """Add (or replace) the prompt expansion of an existing ONNX export: `prompt_expansion.onnx`,
    the tokenizer and words files, and the model's sizes in dims.json. The SDXL files stay as
    they are, so a real expansion joins an export without exporting the UNet again. Every file
    is written beside and then renamed over the old one."""
    import torch

    from pipeline.interfaces import PROMPT_EXPANSION, ModelDims
    from pipeline.torch_leaves import PromptExpansion

    from .checkpoint import load_expansion
    from .onnx_export import export_onnx

    onnx_dir = Path(onnx_dir)
    meta = json.loads((onnx_dir / "dims.json").read_text())
    gpt2 = load_expansion(expansion_dir)
    dims = ModelDims.from_json(meta["dims"])
    dims = replace(dims, extra={**dims.extra, **expansion_dims(gpt2)})
    tmp = Path(tempfile.mkdtemp(dir=onnx_dir, prefix=".expansion-"))
    try:
        written = write_expansion_files(expansion_dir, int(dims.expansion_vocab), tmp, onnx_dir / "tokenizer.json")
        with torch.no_grad():
            export_onnx(None, dims, tmp, names=[PROMPT_EXPANSION],
                        modules={PROMPT_EXPANSION: PromptExpansion(gpt2).eval()})
        (tmp / "dims.json").write_text(json.dumps({**meta, "dims": dims.to_json()}, indent=2))
        for name in (TOKENIZER_FILE, WORDS_FILE, f"{PROMPT_EXPANSION}.onnx.data"):  # none of an earlier one's
            if not (tmp / name).exists() and (onnx_dir / name).exists():
                (onnx_dir / name).unlink()
        for path in [*written, *tmp.glob(f"{PROMPT_EXPANSION}.onnx*"), tmp / "dims.json"]:  # .onnx.data too
            os.replace(path, onnx_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return onnx_dir
