"""Prompt text -> SDXL conditioning, the way Fooocus 2.5 (ComfyUI's tokenizer + Fooocus's weighting
patch) does it.

- Weights: `(text)` multiplies by 1.1 per nesting level, `(text:1.3)` sets the weight (the inner
  level still multiplies: `((a):1.3)` = 1.43), `\\(` and `\\)` are literal parentheses, `[..]` has
  no meaning.
- Tokens: each space-separated word is tokenised on its own; chunks hold 75 tokens between BOS and
  EOS and a word never straddles two chunks unless it has >= 8 tokens. CLIP-L pads with EOS
  (49407), CLIP-G with 0. `embedding:NAME` words (textual inversions) are not supported and are
  dropped, as Fooocus drops one whose file is missing.
- Weighting: when any token weight of a text differs from 1, an empty prompt ([BOS, EOS, pad..])
  is encoded in the same batch; every weighted token becomes (z - z_empty) * w + z_empty and each
  chunk is then rescaled by mean(original chunk) / mean(weighted chunk), per encoder.
- Workloads: each text of a prompt plan is encoded on its own (cached per text) and the results
  are concatenated along the token axis; the pooled vector is the SUM of the first top_k texts'
  pooled vectors (CLIP-G projection of each text's first chunk).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .interfaces import TEXT_ENCODER_G, TEXT_ENCODER_L, TOKENS_PER_CHUNK
from .models import ModelRunner

BOS, EOS = 49406, 49407
PAD_L = EOS  # SDXL tokenizer pads with <|endoftext|>
PAD_G = 0  # SDXL tokenizer_2 pads with "!" (id 0)
CHUNK_BODY = TOKENS_PER_CHUNK - 2  # 75 prompt tokens per chunk
MAX_WORD_TOKENS = 8  # a word with at least this many tokens may be split across chunks
EMBEDDING_PREFIX = "embedding:"
PAD = -1  # placeholder for the per-encoder padding id in encoder-independent token rows

_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))


# Weight syntax


def _escape(text: str) -> str:
    for literal, mark in _ESCAPES:
        text = text.replace(literal, mark)
    return text


def _unescape(text: str) -> str:
    for literal, mark in _ESCAPES:
        text = text.replace(mark, literal[-1])
    return text


def _split_parentheses(text: str) -> list[str]:
    """Top-level pieces: runs of plain text and whole `( .. )` groups (nesting kept inside)."""
    pieces, current, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if current:
                    pieces.append(current)
                current = "("
            else:
                current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                pieces.append(current + ")")
                current = ""
            else:
                current += ch
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


def _segments(text: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for piece in _split_parentheses(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner = piece[1:-1]
            inner_weight = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _segments(inner, inner_weight)
        else:
            out.append((piece, weight))
    return out


def parse_weights(text: str) -> list[tuple[str, float]]:
    """(text segment, weight) pairs, escapes resolved: "a (b:1.2) \\(c\\)" ->
    [("a ", 1.0), ("b", 1.2), (" (c)", 1.0)]."""
    return [(_unescape(seg), w) for seg, w in _segments(_escape(text), 1.0)]


def weighted_words(text: str) -> list[tuple[str, float]]:
    """The words CLIP tokenises one by one, with their weights (segments split on spaces)."""
    words = []
    for segment, weight in parse_weights(text):
        for word in segment.replace("\n", " ").split(" "):
            if word == "":
                continue
            if word.startswith(EMBEDDING_PREFIX):
                # No textual inversions here: dropped like a missing embedding file; trailing
                # commas of the name are kept as text, as ComfyUI does.
                name = word[len(EMBEDDING_PREFIX):].strip("\n")
                stripped = name.strip(",")
                word = name[len(stripped):] if len(stripped) < len(name) else ""
                if word == "":
                    continue
            words.append((word, weight))
    return words


# Chunking


def chunk_token_groups(groups: Sequence[Sequence[tuple[int, float]]]) -> list[list[tuple[int, float]]]:
    """Pack per-word token groups [(id, weight), ..] into rows of 77: BOS, up to 75 tokens, EOS,
    then PAD. A group that does not fit in the current row starts a new row, unless it has
    >= MAX_WORD_TOKENS tokens: then it fills the row and continues in the next. Always >= 1 row."""
    rows: list[list[tuple[int, float]]] = []
    row: list[tuple[int, float]] = [(BOS, 1.0)]
    for group in groups:
        group = list(group)
        is_large = len(group) >= MAX_WORD_TOKENS
        while group:
            if len(group) + len(row) > TOKENS_PER_CHUNK - 1:
                room = TOKENS_PER_CHUNK - 1 - len(row)
                if is_large:
                    row += group[:room]
                    group = group[room:]
                row.append((EOS, 1.0))
                rows.append(row + [(PAD, 1.0)] * (TOKENS_PER_CHUNK - len(row)))
                row = [(BOS, 1.0)]
            else:
                row += group
                group = []
    row.append((EOS, 1.0))
    rows.append(row + [(PAD, 1.0)] * (TOKENS_PER_CHUNK - len(row)))
    return rows


@dataclass(frozen=True)
class TokenizedText:
    """One text's chunks: ids for each encoder (their own padding) and per-token weights."""

    ids_l: np.ndarray  # [n_chunks, 77] int64
    ids_g: np.ndarray  # [n_chunks, 77] int64
    weights: np.ndarray  # [n_chunks, 77] float64

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[tuple[int, float]]]) -> TokenizedText:
        ids = np.array([[t for t, _ in row] for row in rows], dtype=np.int64)
        weights = np.array([[w for _, w in row] for row in rows], dtype=np.float64)
        return cls(np.where(ids == PAD, PAD_L, ids), np.where(ids == PAD, PAD_G, ids), weights)

    @property
    def n_chunks(self) -> int:
        return int(self.ids_l.shape[0])

    @property
    def has_weights(self) -> bool:
        return bool(np.any(self.weights != 1.0))


class ClipTokenizer:
    """The CLIP BPE tokenizer (lower-casing, whitespace clean-up) without special tokens;
    chunking and BOS/EOS/padding are done here so each encoder gets its own padding id."""

    def __init__(self, tokenizer_json: str | Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self._tok.no_padding()
        self._tok.no_truncation()

    def ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def word_ids(self, words: Sequence[str]) -> list[list[int]]:
        """Token ids of each word, tokenised on its own."""
        if not words:
            return []
        return [e.ids for e in self._tok.encode_batch(list(words), add_special_tokens=False)]

    def tokenize(self, text: str) -> TokenizedText:
        """Weight syntax parsed, words tokenised, packed into 77-token chunks."""
        words = weighted_words(text)
        ids = self.word_ids([w for w, _ in words])
        groups = [[(t, weight) for t in word_ids] for word_ids, (_, weight) in zip(ids, words)]
        return TokenizedText.from_rows(chunk_token_groups(groups))

    def chunks(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids for CLIP-L, ids for CLIP-G), each [n_chunks, 77]; at least one chunk."""
        tokens = self.tokenize(text)
        return tokens.ids_l, tokens.ids_g


# Encoding


def empty_ids(pad: int) -> np.ndarray:
    """The empty prompt's chunk for an encoder padding with `pad`: [BOS, EOS, pad, ...]."""
    row = np.full((1, TOKENS_PER_CHUNK), pad, dtype=np.int64)
    row[0, :2] = (BOS, EOS)
    return row


def apply_token_weights(z: torch.Tensor, z_empty: torch.Tensor, weights: np.ndarray | torch.Tensor
                        ) -> torch.Tensor:
    """z [n, 77, D], z_empty [77, D], weights [n, 77]: each token with w != 1 becomes
    (z - z_empty) * w + z_empty, then each chunk is scaled by mean(z chunk) / mean(new chunk).
    Computed in float32 (at least), returned in z's dtype."""
    dtype = z.dtype
    work = torch.promote_types(dtype, torch.float32)
    z, z_empty = z.to(work), z_empty.to(work)
    w = torch.as_tensor(weights, dtype=work)
    weighted = torch.where((w != 1.0)[..., None], (z - z_empty) * w[..., None] + z_empty, z)
    scale = z.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True)
    return (weighted * scale).to(dtype)


def clip_layer(clip_skip: int) -> int:
    """Index into hidden_states: -|clip_skip| (at least -1; 2 = SDXL's penultimate layer)."""
    return -max(1, abs(int(clip_skip)))


def encode_tokens(tokens: TokenizedText, models: ModelRunner, clip_skip: int = 2
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1, 77*n_chunks, L+G hidden], pooled [1, pooled_dim]) of one tokenised text: one
    call per encoder with all chunks (and the empty prompt when weighted) as the batch."""
    layer = clip_layer(clip_skip)
    n = tokens.n_chunks
    weighted = tokens.has_weights
    hidden = []
    pooled = None
    for name, ids, pad in ((TEXT_ENCODER_L, tokens.ids_l, PAD_L), (TEXT_ENCODER_G, tokens.ids_g, PAD_G)):
        batch = np.concatenate([ids, empty_ids(pad)]) if weighted else ids
        out = models(name, {"input_ids": torch.from_numpy(np.ascontiguousarray(batch))})
        z = out["hidden_states"][:, layer]
        if weighted:
            z = apply_token_weights(z[:n], z[n], tokens.weights)
        hidden.append(z[:n])
        if name == TEXT_ENCODER_G:
            pooled = out["text_embeds"][:1]
    context = torch.cat(hidden, dim=-1)
    return context.reshape(1, -1, context.shape[-1]), pooled


def encode_prompt(text: str, tokenizer: ClipTokenizer, models: ModelRunner, clip_skip: int = 2
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1, 77*n_chunks, L+G hidden], pooled [1, pooled_dim]) of one text.

    Both encoders give their hidden layer -clip_skip (2 = SDXL's penultimate layer, no final
    layer norm); the pooled vector is CLIP-G's projection of the first chunk."""
    return encode_tokens(tokenizer.tokenize(text), models, clip_skip)


TextCache = dict  # (text, clip layer) -> (context, pooled)


def encode_workloads(texts: Sequence[str], top_k: int, tokenizer: ClipTokenizer, models: ModelRunner,
                     clip_skip: int = 2, cache: TextCache | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fooocus's clip_encode: every text encoded on its own (through `cache` when given) and the
    contexts concatenated along the token axis; pooled = the sum of the pooled vectors of the
    first `top_k` texts (zeros when top_k is 0).

    The cache must only be shared while the text encoders' weights stay the same (same model,
    same LoRAs)."""
    if not texts:
        raise ValueError("encode_workloads needs at least one text")
    contexts, pooled_sum = [], None
    for i, text in enumerate(texts):
        key = (text, clip_layer(clip_skip))
        hit = cache.get(key) if cache is not None else None
        if hit is None:
            hit = encode_prompt(text, tokenizer, models, clip_skip)
            if cache is not None:
                cache[key] = hit
        context, pooled = hit
        contexts.append(context)
        if i < top_k:
            pooled_sum = pooled if pooled_sum is None else pooled_sum + pooled
    if pooled_sum is None:
        pooled_sum = torch.zeros_like(hit[1])
    return torch.cat(contexts, dim=1), pooled_sum


class PromptEncoder:
    """encode_workloads bound to a tokenizer, a model runner and a clip skip, with its own
    per-text cache (make one per model/LoRA combination, e.g. one per task)."""

    def __init__(self, tokenizer: ClipTokenizer, models: ModelRunner, clip_skip: int = 2):
        self.tokenizer, self.models, self.clip_skip = tokenizer, models, clip_skip
        self.cache: TextCache = {}

    def __call__(self, texts: Sequence[str], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_workloads(texts, top_k, self.tokenizer, self.models, self.clip_skip, self.cache)


def match_lengths(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two contexts of different chunk counts to a common length by repeating each
    (cross-attention over a repeated sequence gives the same result), so CFG runs as one batch."""
    if a.shape[1] == b.shape[1]:
        return a, b
    n = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, n // a.shape[1], 1), b.repeat(1, n // b.shape[1], 1)



def byte_unicode_pairs() -> list[tuple[int, str]]:
    """Byte-level BPE's reversible byte <-> printable-character map (CLIP and GPT-2), as (byte,
    character) pairs in vocabulary order: the printable bytes stand for themselves, the other bytes
    for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + n)) for n, b in enumerate(others)]
