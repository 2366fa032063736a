"""Fooocus V2 prompt expansion: the algorithm on a fake deterministic model, and served end to end."""
from __future__ import annotations

import io
import json
import re

import pytest
import torch

from pipeline.expansion import (
    NEG_INF,
    AllowedTokens,
    ExpansionTokenizer,
    PromptExpander,
    read_words,
)
from pipeline.interfaces import PROMPT_EXPANSION

VOCAB = 49408


@pytest.fixture(scope="module")
def tokenizer(onnx_dir):
    return ExpansionTokenizer(onnx_dir / "tokenizer.json")


def added_words(text: str, prompt: str) -> list[str]:
    """The words the expansion appended after "prompt,"."""
    assert text.startswith(prompt + ",")
    return re.split(r"[,\s]+", text[len(prompt) + 1:].strip(", "))


class FakeGPT2:
    """Deterministic logits that depend on the whole sequence; records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, inputs):
        ids = inputs["input_ids"]
        self.calls.append((model, tuple(ids.shape)))
        g = torch.Generator().manual_seed(int(ids.sum()) % 2**31)
        return {"logits": torch.randn(ids.shape[0], ids.shape[1], VOCAB, generator=g) * 3}


def test_word_list_is_loaded_from_a_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# a comment\nGolden\n\nserene\nserene\n")
    assert read_words(path) == ["golden", "serene"]
    shipped = read_words()
    assert len(shipped) >= 200 and "intricate" in shipped


def test_expansion_keeps_to_the_allowed_words_and_fills_the_token_budget(tokenizer):
    model = FakeGPT2()
    expander = PromptExpander(model, tokenizer, VOCAB)
    prompt = "a cat sitting on a chair"
    text = expander(prompt, seed=7)
    n = len(tokenizer.ids(prompt + ","))
    assert text.startswith(prompt + ",") and len(text) > len(prompt) + 1
    assert len(model.calls) == 75 - n  # one leaf call per new token, up to 75 tokens in all
    assert all(name == PROMPT_EXPANSION for name, _ in model.calls)
    assert model.calls[0][1] == (1, n) and model.calls[-1][1] == (1, 74)
    words = added_words(text, prompt)
    assert words and set(words) <= set(read_words()), words
    assert len(words) == len(set(words))  # no token repeats (the comma excepted)


def test_allowed_token_mask_and_repeat_ban(tokenizer):
    allowed = AllowedTokens.from_words(tokenizer, ["golden", "serene", "notawordzzqx"], VOCAB)
    golden, serene = tokenizer.word_token("golden"), tokenizer.word_token("serene")
    assert allowed.count == 3 and allowed.bias[golden] == 0 and allowed.bias[allowed.comma] == 0
    expander = PromptExpander(FakeGPT2(), tokenizer, VOCAB, words=["golden", "serene"])
    scores = expander.scores(torch.zeros(VOCAB), torch.tensor([golden, allowed.comma]))
    assert scores[golden] == NEG_INF and scores[serene] == 0 and scores[allowed.comma] == 0
    assert (scores == 0).sum() == 2


def test_seeded_determinism(tokenizer):
    expander = PromptExpander(FakeGPT2(), tokenizer, VOCAB)
    a = expander("a lighthouse at dusk", seed=123)
    assert a == expander("a lighthouse at dusk", seed=123)
    assert a == expander("a lighthouse at dusk", seed=123 + 2**32)  # seed mod 2**32
    assert a != expander("a lighthouse at dusk", seed=124)


def test_words_from_a_user_file_restrict_the_expansion(tokenizer, tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("golden\nserene\nvivid\n")
    text = PromptExpander(FakeGPT2(), tokenizer, VOCAB, words=read_words(path))("a fox", seed=1)
    added = added_words(text, "a fox")
    assert added and set(added) <= {"golden", "serene", "vivid"}


def test_no_expansion_for_an_empty_prompt_or_a_full_budget(tokenizer):
    model = FakeGPT2()
    expander = PromptExpander(model, tokenizer, VOCAB)
    assert expander("", seed=1) == ""
    prompt = " ".join(["cat"] * 74)  # 74 tokens + "," = 75: nothing to generate
    assert expander(prompt, seed=1) == prompt and not model.calls


def test_served_fooocus_v2_writes_the_expansion_into_the_metadata(served):
    from PIL import Image

    request = {"prompt": "a red house", "style_selections": ["Fooocus V2"], "aspect_ratios_selection": "256*256",
               "image_seed": 42, "save_meta": True, "meta_scheme": "fooocus",
               "advanced_params": {"overwrite_step": 2, "sampler_name": "euler"}}
    response = served.client.post("/v1/generation/text-to-image", json=request)
    assert response.status_code == 200, response.text
    result = response.json()[0]
    assert result["finish_reason"] == "SUCCESS"
    image = served.client.get("/files/" + result["url"].split("/files/", 1)[1])
    assert image.status_code == 200
    meta = json.loads(Image.open(io.BytesIO(image.content)).info["parameters"])
    assert meta["prompt_expansion"].startswith("a red house,") and len(meta["prompt_expansion"]) > len("a red house,")
    assert "Fooocus V2" in meta["styles"]
