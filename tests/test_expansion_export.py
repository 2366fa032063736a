"""A real-format Fooocus expansion end to end: a Fooocus-style `fooocus_expansion` folder (a seeded
GPT-2 on a GPT-2-style byte-level BPE vocabulary of its own, its tokenizer files and positive.txt)
exported beside the tiny SDXL, written for every target, and expanding prompts in the pipeline.

Only the expansion is exported (`python -m export expansion` into a copy of the cached tiny export
whose SDXL files are links), so no test here exports the SDXL models again."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from export.expansion import TOKENIZER_FILE, WORDS_FILE, ExpansionMismatch, export_expansion, load_tokenizer
from pipeline.expansion import read_words
from pipeline.interfaces import PIPELINE_SPEC, PROMPT_EXPANSION

PROMPT = "a cat sitting on a chair"
ONNX_TARGETS = ("python-ort", "onnxruntime", "tensorrt")


def fooocus_words() -> list[str]:
    """The allowed words: 120 of the project's list (Fooocus's positive.txt has 642)."""
    return read_words()[:120]


def train_tokenizer(words: list[str]):
    """A GPT-2-style byte-level BPE (GPT-2's pre-tokenizer, decoder and <|endoftext|>) trained on
    the allowed words and a few prompts, so that every allowed word is one "Ġword" token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [" ".join(words[i:] + words[:i]) for i in range(0, len(words), 7)] * 20
    corpus += [PROMPT + ", a red house by the sea, a lighthouse at dusk, a fox in the snow"] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert all(tokenizer.token_to_id("Ġ" + w) is not None for w in words)
    return tokenizer


def save_fooocus_folder(folder: Path, tokenizer, vocab: int, seed: int = 7, tokenizer_json: bool = True) -> Path:
    """Fooocus's models/prompt_expansion/fooocus_expansion layout: config.json, pytorch_model.bin,
    vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    positive.txt (one lower-case word per line; here also a capitalised duplicate, a blank line
    and a word that is no single token, which the pipeline skips)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder.mkdir(parents=True)
    eot = tokenizer.token_to_id("<|endoftext|>")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=eot, eos_token_id=eot)).eval()
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()  # pytorch_model.bin, as Fooocus ships it
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    GPT2TokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                      unk_token="<|endoftext|>").save_pretrained(folder)
    tokenizer.model.save(str(folder))  # vocab.json + merges.txt
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    if not tokenizer_json:
        (folder / "tokenizer.json").unlink()
    words = fooocus_words()
    (folder / "positive.txt").write_text("\n".join([*words, words[0].capitalize(), "", "qzxjvkwy"]) + "\n")
    return folder


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return train_tokenizer(fooocus_words())


@pytest.fixture(scope="module")
def fooocus_expansion(gpt2_tokenizer, tmp_path_factory) -> Path:
    return save_fooocus_folder(tmp_path_factory.mktemp("models") / "fooocus_expansion", gpt2_tokenizer,
                               gpt2_tokenizer.get_vocab_size())


def linked_copy(onnx_dir: Path, out: Path) -> Path:
    """The cached tiny export under a new name: the SDXL files linked, the expansion's left out."""
    out.mkdir(parents=True)
    for path in onnx_dir.iterdir():
        if path.name in ("dims.json", "tokenizer.json"):
            shutil.copy2(path, out / path.name)
        elif path.is_file() and not path.name.startswith(PROMPT_EXPANSION):
            (out / path.name).symlink_to(path.resolve())
    return out


@pytest.fixture(scope="module")
def expansion_onnx(onnx_dir, fooocus_expansion, tmp_path_factory) -> Path:
    from export.__main__ import main

    out = linked_copy(onnx_dir, tmp_path_factory.mktemp("export") / "onnx")
    assert main(["expansion", str(fooocus_expansion), "--onnx", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def repositories(expansion_onnx, tmp_path_factory) -> dict[str, Path]:
    from export.__main__ import main

    repos = {}
    for target in ONNX_TARGETS:
        repos[target] = tmp_path_factory.mktemp("repos") / target
        assert main(["repository", "--onnx", str(expansion_onnx), "--out", str(repos[target]),
                     "--target", target]) == 0
    return repos


def added_words(text: str, prompt: str) -> list[str]:
    assert text.startswith(prompt + ",")
    return [w for w in re.split(r"[,\s]+", text[len(prompt) + 1:]) if w]


def test_the_tokenizer_is_read_from_tokenizer_json_or_vocab_and_merges(gpt2_tokenizer, tmp_path):
    with_json = save_fooocus_folder(tmp_path / "a", gpt2_tokenizer, gpt2_tokenizer.get_vocab_size())
    without = save_fooocus_folder(tmp_path / "b", gpt2_tokenizer, gpt2_tokenizer.get_vocab_size(),
                                  tokenizer_json=False)
    a, b = load_tokenizer(with_json), load_tokenizer(without)
    text = PROMPT + ", intricate, elegant"
    assert a.encode(text, add_special_tokens=False).ids == b.encode(text, add_special_tokens=False).ids
    assert a.encode(text, add_special_tokens=False).ids == gpt2_tokenizer.encode(text).ids
    assert a.get_vocab_size(True) == b.get_vocab_size(True) == gpt2_tokenizer.get_vocab_size()
    assert load_tokenizer(tmp_path) is None


def test_export_writes_the_tokenizer_and_words_and_every_target_carries_them(
        expansion_onnx, fooocus_expansion, gpt2_tokenizer, repositories):
    dims = json.loads((expansion_onnx / "dims.json").read_text())["dims"]
    assert dims["extra"]["expansion_vocab"] == gpt2_tokenizer.get_vocab_size()
    assert dims["extra"]["expansion_positions"] == 128
    assert (expansion_onnx / WORDS_FILE).read_text() == (fooocus_expansion / "positive.txt").read_text()
    for target, repo in repositories.items():
        pipeline_dir = repo / PIPELINE_SPEC.name / "1"
        assert (pipeline_dir / TOKENIZER_FILE).read_bytes() == (expansion_onnx / TOKENIZER_FILE).read_bytes(), target
        assert (pipeline_dir / WORDS_FILE).read_bytes() == (expansion_onnx / WORDS_FILE).read_bytes(), target
        assert (repo / PROMPT_EXPANSION / "1" / "model.onnx").exists()
        info = json.loads((pipeline_dir / "model_info.json").read_text())
        assert info["dims"]["extra"]["expansion_vocab"] == gpt2_tokenizer.get_vocab_size()


def test_the_pipeline_expands_with_the_exported_gpt2_and_its_words(expansion_onnx, repositories):
    from pipeline.generate import Pipeline
    from pipeline.models import OnnxRuntimeModels
    from pipeline.task import GenerationTask

    pipeline = Pipeline.from_dir(repositories["python-ort"] / PIPELINE_SPEC.name / "1",
                                 OnnxRuntimeModels(expansion_onnx))
    assert pipeline.expander is not None
    allowed = set(read_words(expansion_onnx / WORDS_FILE))
    texts = {seed: pipeline.expander(PROMPT, seed) for seed in (1, 2, 3)}
    for seed, text in texts.items():
        words = added_words(text, PROMPT)
        assert len(words) >= 20 and set(words) <= allowed, (seed, text)
        assert len(words) == len(set(words))  # no repeats
        assert "qzxjvkwy" not in words
        assert 70 <= len(pipeline.expansion_tokenizer.ids(text)) <= 75  # filled up to 75 tokens (end commas go)
    assert texts[1] == pipeline.expander(PROMPT, 1) == pipeline.expander(PROMPT, 1 + 2**32)
    assert len(set(texts.values())) == 3

    results = []
    task = GenerationTask.from_dict({"prompt": PROMPT, "style_selections": ["Fooocus V2"], "image_seed": 2,
                                     "aspect_ratios_selection": "256*256",
                                     "advanced_params": {"overwrite_step": 2, "sampler_name": "euler"}})
    pipeline.run(task, lambda event, image: results.append(event) if event["type"] == "result" else None)
    (result,) = results
    assert result["prompt_expansion"] == texts[2] and "Fooocus V2" in result["styles"]


def test_expansion_words_flag_replaces_the_word_list(expansion_onnx, tmp_path, caplog):
    from export.__main__ import main

    words = tmp_path / "my_words.txt"
    words.write_text("intricate\nelegant\nqzxjvkwy\n")
    repo = tmp_path / "repo"
    assert main(["repository", "--onnx", str(expansion_onnx), "--out", str(repo),
                 "--expansion-words", str(words)]) == 0
    assert (repo / PIPELINE_SPEC.name / "1" / WORDS_FILE).read_text() == words.read_text()
    assert "1 of 3 words are not single tokens" in caplog.text

    (tmp_path / "none.txt").write_text("qzxjvkwy\nzzqqxxj\n")
    with caplog.at_level(logging.ERROR):
        assert main(["repository", "--onnx", str(expansion_onnx), "--out", str(tmp_path / "repo2"),
                     "--expansion-words", str(tmp_path / "none.txt")]) == 2
    assert "none of its 2 words is a single token" in caplog.text


def test_a_vocabulary_mismatch_fails_the_export(onnx_dir, tiny_checkpoint, gpt2_tokenizer, tmp_path, caplog):
    from export.__main__ import main

    # A tokenizer that is not the model's: the GPT-2 has a larger vocabulary.
    wrong = save_fooocus_folder(tmp_path / "wrong", gpt2_tokenizer, gpt2_tokenizer.get_vocab_size() + 7)
    out = linked_copy(onnx_dir, tmp_path / "onnx")
    dims_before = (out / "dims.json").read_text()
    with pytest.raises(ExpansionMismatch, match=r"has a \d+-token vocabulary but the tokenizer in .*wrong has \d+"):
        export_expansion(wrong, out)
    assert (out / "dims.json").read_text() == dims_before and not (out / TOKENIZER_FILE).exists()
    assert not list(out.glob(".expansion-*"))

    # A GPT-2 vocabulary without its tokenizer files: CLIP's does not fit either.
    bare = tmp_path / "bare"
    shutil.copytree(wrong, bare, ignore=shutil.ignore_patterns("*.json", "merges.txt"))
    shutil.copy2(wrong / "config.json", bare / "config.json")
    with pytest.raises(ExpansionMismatch, match=r"CLIP's tokenizer .* has no tokenizer.json"):
        export_expansion(bare, out)

    # The checkpoint export checks before exporting anything; the CLI says why and exits 2.
    with caplog.at_level(logging.ERROR):
        assert main(["onnx", str(tiny_checkpoint), "--out", str(tmp_path / "full"), "--expansion", str(wrong)]) == 2
    assert "vocabulary" in caplog.text and not (tmp_path / "full").exists()


def test_the_pipeline_warns_once_on_a_repository_without_the_expansion_tokenizer(repositories, tmp_path, caplog):
    from pipeline.generate import Pipeline

    pipeline_dir = tmp_path / "pipeline"
    shutil.copytree(repositories["python-ort"] / PIPELINE_SPEC.name / "1", pipeline_dir)
    (pipeline_dir / TOKENIZER_FILE).unlink()  # written by hand or by an older exporter
    with caplog.at_level(logging.WARNING, logger="pipeline.expansion"):
        first = Pipeline.from_dir(pipeline_dir, models=None)
        second = Pipeline.from_dir(pipeline_dir, models=None)
    assert first.expander is None and second.expander is None
    warnings = [r for r in caplog.records if "prompt expansion is off" in r.getMessage()]
    assert len(warnings) == 1 and "49408 tokens" in warnings[0].getMessage()


def test_python_torch_repository_serves_an_expansion_folder(tiny_checkpoint, fooocus_expansion, gpt2_tokenizer,
                                                            tmp_path):
    from export.__main__ import write_torch_repository
    from pipeline.torch_leaves import load_leaf

    repo = write_torch_repository(tiny_checkpoint, tmp_path / "repo", "cpu", work=tmp_path / "work",
                                  expansion=fooocus_expansion)
    pipeline_dir = repo / PIPELINE_SPEC.name / "1"
    assert (pipeline_dir / WORDS_FILE).read_text() == (fooocus_expansion / "positive.txt").read_text()
    assert load_tokenizer(fooocus_expansion).to_str() == load_tokenizer_json(pipeline_dir / TOKENIZER_FILE)
    config = (repo / PROMPT_EXPANSION / "config.pbtxt").read_text()
    checkpoint = re.search(r'key: "checkpoint"\s*value: \{ string_value: "([^"]*)" \}', config).group(1)
    leaf = load_leaf(PROMPT_EXPANSION, checkpoint)
    with torch.no_grad():
        logits = leaf(torch.tensor([gpt2_tokenizer.encode(PROMPT).ids]))
    assert logits.shape[-1] == gpt2_tokenizer.get_vocab_size()


def load_tokenizer_json(path: Path) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).to_str()
