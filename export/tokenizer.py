"""The real CLIP BPE tokenizer, built offline from the vocabulary file that ships inside the
`open-clip-torch` wheel (the package is never imported: it would import torchvision)."""
from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from pipeline.text import byte_unicode_pairs

VOCAB_SIZE = 49408
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def bpe_vocab_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    return Path(spec.submodule_search_locations[0]) / BPE_FILE


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49,408-entry vocabulary and 48,894 merges."""
    lines = gzip.open(bpe_vocab_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # 48,894 merges (CLIP: 49,152 minus bytes and specials)
    units = [c for _, c in byte_unicode_pairs()]
    vocab = units + [u + "</w>" for u in units]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_vocab_files(out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    vocab_json, merges_txt = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_json.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_txt.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_json, merges_txt


def sdxl_tokenizers(work_dir: Path):
    """SDXL's two tokenizers: identical BPE, padding with <|endoftext|> (1) and "!" (2)."""
    from transformers import CLIPTokenizer

    vocab_json, merges_txt = write_vocab_files(work_dir)
    tok = CLIPTokenizer(str(vocab_json), str(merges_txt), model_max_length=77, pad_token="<|endoftext|>")
    tok2 = CLIPTokenizer(str(vocab_json), str(merges_txt), model_max_length=77, pad_token="!")
    return tok, tok2
