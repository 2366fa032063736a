"""Prompt -> SDXL conditioning: CLIP tokenisation in 75-token chunks and the two text encoders."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .interfaces import TEXT_ENCODER_G, TEXT_ENCODER_L, TOKENS_PER_CHUNK
from .models import ModelRunner

BOS, EOS = 49406, 49407
PAD_L = EOS  # SDXL tokenizer pads with <|endoftext|>
PAD_G = 0  # SDXL tokenizer_2 pads with "!" (id 0)


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

    def chunks(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids for CLIP-L, ids for CLIP-G), each [n_chunks, 77]; at least one chunk."""
        ids = self.ids(text)
        body = TOKENS_PER_CHUNK - 2
        pieces = [ids[i:i + body] for i in range(0, len(ids), body)] or [[]]
        out_l = np.full((len(pieces), TOKENS_PER_CHUNK), PAD_L, dtype=np.int64)
        out_g = np.full((len(pieces), TOKENS_PER_CHUNK), PAD_G, dtype=np.int64)
        for row, piece in enumerate(pieces):
            seq = [BOS, *piece, EOS]
            out_l[row, :len(seq)] = seq
            out_g[row, :len(seq)] = seq
        return out_l, out_g


def encode_prompt(text: str, tokenizer: ClipTokenizer, models: ModelRunner, clip_skip: int = 2
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1, 77*n_chunks, L+G hidden], pooled [1, pooled_dim]).

    Both encoders give their hidden layer -clip_skip (2 = SDXL's penultimate layer, no final
    layer norm); the pooled vector is CLIP-G's projection of the first chunk."""
    ids_l, ids_g = tokenizer.chunks(text)
    hidden_l = models(TEXT_ENCODER_L, {"input_ids": torch.from_numpy(ids_l)})["hidden_states"]
    out_g = models(TEXT_ENCODER_G, {"input_ids": torch.from_numpy(ids_g)})
    layer = -max(1, int(clip_skip))
    context = torch.cat([hidden_l[:, layer], out_g["hidden_states"][:, layer]], dim=-1)
    context = context.reshape(1, -1, context.shape[-1])
    return context, out_g["text_embeds"][:1]


def match_lengths(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two contexts of different chunk counts to a common length by repeating each
    (cross-attention over a repeated sequence gives the same result), so CFG runs as one batch."""
    if a.shape[1] == b.shape[1]:
        return a, b
    n = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, n // a.shape[1], 1), b.repeat(1, n // b.shape[1], 1)
