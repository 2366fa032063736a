"""Prompt processing and text encoding, Fooocus 2.5's way: styles, wildcards, arrays, LoRA tags,
multi-line workloads, weight syntax, 75-token chunking, the weighting math and the pooled sum.

The encoder tests run on a fake model runner whose outputs are a fixed function of the input ids,
so every expected tensor is recomputed here with plain numpy loops."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.interfaces import TEXT_ENCODER_G, TEXT_ENCODER_L
from pipeline.prompts import (
    LoraTag,
    WildcardLibrary,
    apply_arrays,
    apply_wildcards,
    cleanup_prompt,
    extract_lora_tags,
    merge_prompt_loras,
    process_prompts,
    safe_str,
)
from pipeline.styles import STYLE_NAMES, Style, StyleLibrary, normalize_style_name
from pipeline.text import (
    BOS,
    EOS,
    PAD,
    ClipTokenizer,
    PromptEncoder,
    chunk_token_groups,
    encode_prompt,
    encode_workloads,
    parse_weights,
)

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = StyleLibrary.builtin()
STYLE_ORDER = list(STYLE_NAMES[2:])

# A small library with known templates for the merge rules.
TOY = StyleLibrary({
    "A": Style("a {prompt} a", "na"),
    "B": Style("", "nb"),  # negative only
    "C": Style("c {prompt}\nc2", "nc1\nnc2"),  # two lines each
    "D": Style("d only", ""),  # positive without the placeholder
})


def plan(prompt="", negative="", styles=(), seed=1, index=0, library=TOY, wildcards=None, **fields):
    return process_prompts({"prompt": prompt, "negative_prompt": negative, "style_selections": list(styles),
                            **fields}, index, seed, library, wildcards)


# Styles


def test_builtin_templates_cover_every_style_name_in_order():
    data = json.loads((ROOT / "pipeline" / "style_templates.json").read_text())
    assert list(data) == STYLE_ORDER and len(data) == 277
    assert "Fooocus V2" not in data and "Random Style" not in data
    for name, entry in data.items():
        assert set(entry) == {"prompt", "negative_prompt"}
        assert entry["negative_prompt"], name
        assert entry["prompt"] == "" or entry["prompt"].count("{prompt}") == 1, name
    negative_only = [n for n, e in data.items() if e["prompt"] == ""]
    assert negative_only == ["Fooocus Enhance", "Fooocus Semi Realistic", "Fooocus Negative"]
    assert BUILTIN.legal_names == STYLE_NAMES


@pytest.mark.parametrize("name", ["Fooocus Sharp", "SAI Anime", "Mk Ukiyo E", "Fooocus Pony", "Dark Moody Atmosphere"])
def test_named_builtin_style(name):
    p = plan("a red fox", "blurry", [name], library=BUILTIN)
    style = BUILTIN[name]
    assert p.positive == (style.prompt.replace("{prompt}", "a red fox"),)
    assert p.negative == (style.negative_prompt, "blurry")
    assert (p.positive_top_k, p.negative_top_k) == (1, 2)
    assert p.styles == (name,) and not p.use_expansion


def test_default_styles_are_fooocus_v2_enhance_and_sharp():
    p = process_prompts({"prompt": "a cat"}, 0, 7, BUILTIN)
    assert p.use_expansion and p.styles == ("Fooocus V2", "Fooocus Enhance", "Fooocus Sharp")
    assert p.positive == (BUILTIN["Fooocus Sharp"].prompt.replace("{prompt}", "a cat"),)
    assert p.negative == (BUILTIN["Fooocus Enhance"].negative_prompt, BUILTIN["Fooocus Sharp"].negative_prompt)
    assert (p.positive_top_k, p.negative_top_k) == (1, 2)


@pytest.mark.parametrize("styles, prompt, negative, positive_out, negative_out", [
    ([], "P", "N", ["P"], ["N"]),
    ([], "P", "", ["P"], [""]),  # nothing left: the (empty) negative itself
    (["A"], "P", "N", ["a P a"], ["na", "N"]),
    (["B"], "P", "N", ["P"], ["nb", "N"]),  # no "{prompt}" anywhere: P goes first
    (["B", "A"], "P", "N", ["a P a"], ["nb", "na", "N"]),
    (["D"], "P", "N", ["P", "d only"], ["N"]),  # empty negative line dropped
    (["C"], "P", "N", ["c P", "c2"], ["nc1", "nc2", "N"]),
    (["A", "C"], "P", "N", ["a P a", "c P", "c2"], ["na", "nc1", "nc2", "N"]),
    (["A", "A"], "P", "", ["a P a", "a P a"], ["na", "na"]),  # repeats are applied again
    (["nope", "A", "Bogus Style"], "P", "N", ["a P a"], ["na", "N"]),  # unknown names dropped
    (["B"], "", "", [""], ["nb"]),
])
def test_style_merge_rules(styles, prompt, negative, positive_out, negative_out):
    p = plan(prompt, negative, styles)
    assert list(p.positive) == positive_out and list(p.negative) == negative_out
    assert (p.positive_top_k, p.negative_top_k) == (len(positive_out), len(negative_out))
    assert list(p.styles) == [s for s in styles if s in TOY]


@pytest.mark.parametrize("seed", [0, 1, 2, 12345, 2**63 - 1])
def test_random_style_is_drawn_from_the_image_rng(seed):
    p = plan("P", "", ["Random Style"], seed=seed, library=BUILTIN)
    expected = random.Random(seed).choice(STYLE_ORDER)
    assert p.styles == (expected,)
    assert p.positive == plan("P", "", [expected], library=BUILTIN).positive
    assert plan("P", "", ["Random Style"], seed=seed, library=BUILTIN) == p  # deterministic


def test_random_style_varies_with_the_seed_and_follows_the_wildcard_draws():
    picks = {plan("P", "", ["Random Style"], seed=s, library=BUILTIN).styles[0] for s in range(6)}
    assert len(picks) > 1
    lib = WildcardLibrary({"w": ["x", "y", "z"]})
    p = plan("__w__", "", ["Random Style", "Random Style"], seed=99, library=BUILTIN, wildcards=lib)
    rng = random.Random(99)
    word = rng.choice(["x", "y", "z"])
    assert p.task_prompt == word
    assert p.styles == (rng.choice(STYLE_ORDER), rng.choice(STYLE_ORDER))


def test_fooocus_v2_turns_on_expansion_and_is_logged_first():
    p = plan("a cat", "", ["A", "Fooocus V2"], seed=2**40 + 5)
    assert p.use_expansion and p.styles == ("Fooocus V2", "A")
    assert p.positive == ("a a cat a",) and p.positive_top_k == 1
    assert p.expansion_prompt == "a cat" and p.expansion_seed == (2**40 + 5) % 2**32
    assert p.positive_texts == ["a a cat a"] and p.prompt_expansion == ""
    q = p.with_expansion("a cat, intricate, elegant")
    assert q.positive_texts == ["a a cat a", "a cat, intricate, elegant"] and q.positive_top_k == 1
    assert q.full_prompt == q.positive_texts and q.prompt_expansion == "a cat, intricate, elegant"
    empty = plan("", "", ["Fooocus V2", "A"])  # no prompt, no expansion (and not logged)
    assert not empty.use_expansion and empty.styles == ("A",)


@pytest.mark.parametrize("raw, key", [
    ("sai-3d-model", "SAI 3D Model"),
    ("mre-sumi-e-symbolic", "MRE Sumi E Symbolic"),
    ("Fooocus Sharp", "Fooocus Sharp"),
    ("ads-gourmet food PHOTOGRAPHY", "Ads Gourmet Food Photography"),
    ("flat 2d art", "Flat 2d Art"),
    ("misc (stained glass)", "Misc (Stained Glass)"),
    ("saint-art", "SAInt Art"),  # Fooocus's blunt replace
    ("pop-art--2", "Pop Art  2"),
])
def test_style_name_normalisation(raw, key):
    assert normalize_style_name(raw) == key


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_user_style_folder_overrides_and_extends_in_fooocus_order(tmp_path):
    write_json(tmp_path / "my_styles.json", [
        {"name": "my-cool style", "prompt": "cool {prompt}", "negative_prompt": "uncool"},
        {"name": "sai-anime", "prompt": "user anime {prompt}", "negative_prompt": "x"},
    ])
    write_json(tmp_path / "sdxl_styles_sai.json", [{"name": "sai-3d-model", "prompt": "user 3d {prompt}"}])
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    write_json(tmp_path / "partly.json", [{"name": "kept", "prompt": "{prompt}!"}, {"prompt": "no name"},
                                          {"name": "after the error"}])
    lib = StyleLibrary.from_folder(tmp_path)
    # Other files first (sorted), then Fooocus's own files, built-ins standing in for the missing ones.
    assert lib.names[:3] == ("My Cool Style", "SAI Anime", "Kept")
    assert lib.names[3:11] == tuple(STYLE_ORDER[:8])
    assert lib.names[11] == "SAI 3D Model"
    assert len(lib) == 277 + 2 and "After The Error" not in lib
    assert lib["SAI Anime"] == Style("user anime {prompt}", "x")
    assert lib["SAI 3D Model"] == Style("user 3d {prompt}", "")
    assert lib["SAI Pixel Art"] == BUILTIN["SAI Pixel Art"]
    p = plan("fox", "", ["My Cool Style", "SAI 3D Model", "Not There"], library=lib)
    assert p.positive == ("cool fox", "user 3d fox") and p.negative == ("uncool",)
    assert "My Cool Style" in lib.legal_names and StyleLibrary.from_folder(tmp_path / "missing") is BUILTIN


def test_a_full_fooocus_style_folder_gives_exactly_its_styles(tmp_path):
    start = 2
    for file_name, count in (("sdxl_styles_fooocus.json", 8), ("sdxl_styles_sai.json", 17),
                             ("sdxl_styles_mre.json", 22), ("sdxl_styles_twri.json", 89),
                             ("sdxl_styles_diva.json", 79), ("sdxl_styles_marc_k3nt3l.json", 62)):
        names = STYLE_NAMES[start:start + count]
        start += count
        write_json(tmp_path / file_name, [{"name": n.lower().replace(" ", "-"), "prompt": f"<{n}> {{prompt}}",
                                           "negative_prompt": f"not {n}"} for n in names])
    write_json(tmp_path / "sub" / "extra.json", [{"name": "zz extra", "prompt": "{prompt} zz"}])
    lib = StyleLibrary.from_folder(tmp_path)
    assert lib.names == ("Zz Extra", *STYLE_ORDER)  # sub-folder file before the six
    assert all(lib[n] == Style(f"<{n}> {{prompt}}", f"not {n}") for n in STYLE_ORDER)
    p = plan("P", "", ["Random Style"], seed=5, library=lib)
    assert p.styles == (random.Random(5).choice(["Zz Extra", *STYLE_ORDER]),)


# Wildcards


COLORS, ANIMALS, FLOWERS = ["red", "green", "blue"], ["cat", "dog"], ["rose", "tulip", "iris", "lily"]
LIB = WildcardLibrary({"color": COLORS, "animal": ANIMALS, "flower": FLOWERS,
                       "color_flower": ["__color__ __flower__"], "loop": ["__loop__ x"], "empty": ["", ""]})


@pytest.mark.parametrize("seed", [0, 3, 2024])
def test_wildcards_draw_from_the_rng_first_occurrence_first(seed):
    rng = random.Random(seed)
    c1, a, c2 = rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(COLORS)
    assert apply_wildcards("__color__ __animal__ and __color__", random.Random(seed), 0, False, LIB) == f"{c1} {a} and {c2}"


@pytest.mark.parametrize("index, expected", [(0, "red cat and red"), (1, "green dog and green"),
                                             (4, "green cat and green"), (5, "blue dog and blue")])
def test_wildcards_in_order_use_the_image_index(index, expected):
    rng = random.Random(0)
    assert apply_wildcards("__color__ __animal__ and __color__", rng, index, True, LIB) == expected
    assert rng.random() == random.Random(0).random()  # no draws


@pytest.mark.parametrize("seed", [1, 8])
def test_nested_wildcards(seed):
    rng = random.Random(seed)
    rng.choice(["__color__ __flower__"])
    c, f = rng.choice(COLORS), rng.choice(FLOWERS)
    assert apply_wildcards("__color_flower__", random.Random(seed), 0, False, LIB) == f"{c} {f}"
    # Same round: the nested "__color__" is now the first occurrence and is replaced before the
    # original one, which waits for the next round together with "__flower__".
    rng = random.Random(seed)
    rng.choice(["__color__ __flower__"])
    c1 = rng.choice(COLORS)
    f, c2 = rng.choice(FLOWERS), rng.choice(COLORS)
    assert apply_wildcards("__color_flower__ __color__", random.Random(seed), 0, False, LIB) == f"{c1} {f} {c2}"


def test_wildcard_depth_limit_is_64_rounds():
    assert apply_wildcards("__loop__", random.Random(0), 0, False, LIB) == "__loop__" + " x" * 64


@pytest.mark.parametrize("text, expected", [("__nope__ and __nope__", "nope and nope"), ("__empty__!", "empty!"),
                                            ("__bad name__", "__bad name__"), ("a__b", "a__b")])
def test_missing_or_empty_wildcards_become_their_name(text, expected):
    rng = random.Random(4)
    assert apply_wildcards(text, rng, 0, False, LIB) == expected
    assert rng.random() == random.Random(4).random()
    assert apply_wildcards("__color__", random.Random(0), 0, False, None) == "color"


def test_wildcard_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "color.txt").write_text("red\n\nblue\n", encoding="utf-8")
    (tmp_path / "animal.txt").write_text("root-cat\n", encoding="utf-8")
    (tmp_path / "sub" / "animal.txt").write_text("sub-cat\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    lib = WildcardLibrary.from_dir(tmp_path)
    assert set(lib.names) == {"color", "animal"}
    assert lib.choices("color") == ["red", "blue"] and lib.choices("animal") == ["sub-cat"]
    assert apply_wildcards("__color__", random.Random(0), 1, True, lib) == "blue"
    assert WildcardLibrary.from_dir(tmp_path / "missing") is None


def test_wildcards_run_on_every_line_with_one_rng_in_fooocus_order():
    lib = WildcardLibrary({"a": ["a1", "a2", "a3"], "b": ["b1", "b2", "b3"], "c": ["c1", "c2", "c3"],
                           "d": ["d1", "d2", "d3"]})
    p = plan("__a__\n__b__", "__c__\n__d__", seed=77, wildcards=lib)
    rng = random.Random(77)
    a, c, b, d = (rng.choice(lib.choices(k)) for k in "acbd")
    assert p.positive == (a, b) and p.negative == (c, d)
    assert p.log_prompt == f"{a}\n{b}" and p.log_negative_prompt == f"{c}\n{d}"
    inorder = plan("__a__", "__c__", index=2, wildcards=lib, read_wildcards_in_order=True)
    assert inorder.positive == ("a3",) and inorder.negative == ("c3",)
    adv = plan("__a__", index=1, wildcards=lib, advanced_params={"read_wildcards_in_order": True})
    assert adv.positive == ("a2",)


# Arrays


@pytest.mark.parametrize("text, index, expected", [
    ("[[red,green,blue]] cat", 0, "red cat"),
    ("[[red,green,blue]] cat", 1, "green cat"),
    ("[[red,green,blue]] cat", 4, "green cat"),
    ("[[a,b]] [[x,y,z]]", 0, "a x"), ("[[a,b]] [[x,y,z]]", 1, "b x"), ("[[a,b]] [[x,y,z]]", 2, "a y"),
    ("[[a,b]] [[x,y,z]]", 5, "b z"), ("[[a,b]] [[x,y,z]]", 6, "a x"),
    ("x[[ a, b]]", 1, "x b"),  # items are not trimmed
    ("[[a,b]] and [[a,b]]", 1, "b and a"),
    ("[[solo]] [single]", 3, "solo [single]"),
    ("no arrays", 3, "no arrays"),
])
def test_arrays(text, index, expected):
    assert apply_arrays(text, index) == expected


def test_arrays_only_on_the_main_positive_line():
    p = plan("[[a,b]] cat\n[[c,d]]", "[[e,f]]", index=1)
    # The main line's comma clean-up turns "[[a,b]]" into "[[a, b]]", so the item keeps a space.
    assert p.positive == (" b cat", "[[c,d]]") and p.negative == ("[[e,f]]",)


# LoRA tags and clean-up


@pytest.mark.parametrize("prompt, tags, cleaned", [
    ("a cat <lora:foo:0.5>, b", [("foo", 0.5)], "a cat, b"),
    ("<lora:x:1>,<lora:y:-.5> z", [("x", 1.0), ("y", -0.5)], "z"),
    ("<lora:my lora:+1.25>", [("my lora", 1.25)], ""),
    ("<lora:a:1><lora:b:2> c", [("a", 1.0), ("b", 2.0)], "c"),
    ("<lora:bad:abc> q", [], "<lora:bad:abc> q"),
    ("a,,b  c , ,", [], "a, b c"),
    ("a,b", [], "a, b"),
])
def test_lora_tags_are_pulled_out_of_the_main_line(prompt, tags, cleaned):
    found, text = extract_lora_tags(prompt)
    assert [(t.name, t.weight) for t in found] == tags and text == cleaned


def test_lora_tags_in_process_prompts():
    p = plan("a <lora:foo:0.7> cat\nextra <lora:bar:1>", "neg <lora:baz:1>", ["A"])
    assert p.lora_tags == (LoraTag("foo", 0.7),)
    assert p.positive == ("a a cat a", "extra <lora:bar:1>") and p.negative == ("na", "neg <lora:baz:1>")


def test_merge_prompt_loras():
    files = ["sub/foo.safetensors", "a.safetensors", "c.safetensors"]
    loras = [("a.safetensors", 0.5), ("None", 1.0)]
    tags = [LoraTag("foo", 0.3), LoraTag("a", 1.0), LoraTag("missing", 1.0), LoraTag("foo", 0.3)]
    assert merge_prompt_loras(loras, tags, files) == [("a.safetensors", 0.5), ("sub/foo.safetensors", 0.3)]
    assert merge_prompt_loras(loras, [LoraTag("missing", 1.0)], files) == loras  # unchanged, "None" kept
    full = [(f"l{i}.safetensors", 1.0) for i in range(5)]
    assert merge_prompt_loras(full, [LoraTag("c", 0.2)], files) == full  # cut to 5


@pytest.mark.parametrize("raw, expected", [("  a   cat ,. ", "a cat"), (".,x,.", "x"), ("a  \t b", "a \t b")])
def test_safe_str(raw, expected):
    assert safe_str(raw) == expected
    assert cleanup_prompt(" a ,  b,,c ") == "a, b, c"


# Multi-line workloads


def test_multi_line_prompts_are_separate_workloads():
    p = plan("main\n\n  extra one ,\nextra two", "neg\nneg2", ["A", "B"])
    assert p.positive == ("a main a", "extra one", "extra two")
    assert p.negative == ("na", "nb", "neg", "neg2")
    assert (p.positive_top_k, p.negative_top_k) == (3, 4)
    assert p.log_prompt == "main\nextra one\nextra two" and p.task_prompt == "main"


def test_first_non_empty_line_is_the_main_prompt():
    p = plan("\n\n  first\nsecond", "", ["A", "Fooocus V2"])
    assert p.positive == ("a first a", "second") and p.use_expansion


@pytest.mark.parametrize("seed, index", [(5, 0), (2**63 + 9, 2), (2**40 + 1, 1)])
def test_seeds(seed, index):
    p = plan("P", seed=seed, index=index)
    assert p.seed == seed % 2**63 and p.expansion_seed == (seed % 2**63) % 2**32


# Weight syntax


@pytest.mark.parametrize("text, expected", [
    ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
    ("((b))", [("b", 1.1 * 1.1)]),
    ("(b:1.5)", [("b", 1.5)]),
    ("((b):1.5)", [("b", 1.5 * 1.1)]),
    ("((b:1.5))", [("b", 1.5)]),
    ("(a:1.2)(b)", [("a", 1.2), ("b", 1.1)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(b:x)", [("b:x", 1.1)]),
    ("(:1.2)", [(":1.2", 1.1)]),
    ("(a, b:0.5) c", [("a, b", 0.5), (" c", 1.0)]),
    ("\\(b\\)", [("(b)", 1.0)]),
    ("(a \\(b\\):0.5)", [("a (b)", 0.5)]),
    ("[b]", [("[b]", 1.0)]),
    ("a (b", [("a ", 1.0), ("(b", 1.0)]),
    ("a) b", [("a) b", 1.0)]),
])
def test_weight_parsing(text, expected):
    got = parse_weights(text)
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


# Chunking


class CharTokenizer(ClipTokenizer):
    """One token per non-space character (id = its code point), so token counts are obvious."""

    def __init__(self):
        pass

    def ids(self, text):
        return [ord(c) for c in text if not c.isspace()]

    def word_ids(self, words):
        return [self.ids(w) for w in words]


def singles(n, start=1000):
    return [[(start + i, 1.0)] for i in range(n)]


def body(row):
    """A row's tokens between BOS and EOS."""
    ids = [t for t, _ in row]
    assert ids[0] == BOS and len(ids) == 77
    end = ids.index(EOS)
    assert all(t == PAD for t in ids[end + 1:])
    return ids[1:end]


@pytest.mark.parametrize("groups, sizes", [
    ([], [0]),
    (singles(75), [75]),
    (singles(76), [75, 1]),
    (singles(74) + [[(7, 1.0)] * 3], [74, 3]),  # a short word moves to the next chunk whole
    (singles(74) + [[(7, 1.0)] * 7], [74, 7]),
    (singles(74) + [[(7, 1.0)] * 8], [75, 7]),  # >= 8 tokens: split across chunks
    ([[(7, 1.0)] * 200], [75, 75, 50]),
    (singles(150), [75, 75]),
])
def test_chunking_keeps_words_whole_unless_they_have_8_tokens(groups, sizes):
    rows = chunk_token_groups(groups)
    assert [len(body(r)) for r in rows] == sizes
    assert [t for r in rows for t in body(r)] == [t for g in groups for t, _ in g]


def test_tokenize_pads_per_encoder_and_carries_weights():
    tok = CharTokenizer()
    t = tok.tokenize("ab (cd:1.5)")
    assert t.ids_l.shape == t.ids_g.shape == t.weights.shape == (1, 77)
    assert list(t.ids_l[0, :6]) == [BOS, 97, 98, 99, 100, EOS] and set(t.ids_l[0, 6:]) == {EOS}
    assert list(t.ids_g[0, :6]) == [BOS, 97, 98, 99, 100, EOS] and set(t.ids_g[0, 6:]) == {0}
    assert list(t.weights[0, :6]) == [1, 1, 1, 1.5, 1.5, 1] and t.has_weights
    empty_l, empty_g = tok.chunks("")
    assert list(empty_l[0, :3]) == [BOS, EOS, EOS] and list(empty_g[0, :3]) == [BOS, EOS, 0]
    long_l, _ = tok.chunks("x " * 70 + "abcdefg")  # 7 tokens: moves
    assert long_l.shape == (2, 77) and list(long_l[1, :9]) == [BOS, *map(ord, "abcdefg"), EOS]
    long_l, _ = tok.chunks("x " * 70 + "abcdefgh")  # 8 tokens: split 5 + 3
    assert list(long_l[0, 71:77]) == [*map(ord, "abcde"), EOS] and list(long_l[1, :5]) == [BOS, *map(ord, "fgh"), EOS]
    assert list(tok.chunks("a embedding:foo b")[0][0, :4]) == [BOS, 97, 98, EOS]  # no textual inversions
    assert list(tok.chunks("embedding:foo,, b")[0][0, :5]) == [BOS, 44, 44, 98, EOS]


def real_tokenizer():
    found = sorted((ROOT / "build" / "onnx").glob("*/tokenizer.json"))
    if not found:
        pytest.skip("no exported tokenizer.json under build/onnx")
    return ClipTokenizer(found[-1])


def test_real_tokenizer_word_by_word():
    tok = real_tokenizer()
    t = tok.tokenize("(Astronaut:1.2) riding a \\(horse\\)")
    plain = tok.ids("astronaut riding a (horse)")
    assert list(t.ids_l[0, 1:len(plain) + 1]) == plain
    assert list(t.weights[0, :len(plain) + 2]) == [1.0, 1.2] + [1.0] * len(plain)
    ids_l, ids_g = tok.chunks("A  Photo of an astronaut")
    assert list(ids_l[0, :7]) == [BOS, 320, 1125, 539, 550, 18376, EOS] and ids_g[0, 7] == 0


# Encoding on a fake model runner

L_DIM, G_DIM, LAYERS, POOLED = 4, 6, 3, 5


def fake_hidden(ids: np.ndarray, dim: int) -> np.ndarray:
    """[B, LAYERS+1, 77, dim]: depends on every id up to the position (like a causal encoder)."""
    prefix = np.cumsum(ids % 1009, axis=1).astype(np.float64)  # [B, 77]
    layer = np.arange(LAYERS + 1)[None, :, None, None]
    pos = np.arange(77)[None, None, :, None]
    d = np.arange(dim)[None, None, None, :]
    return 0.5 + np.sin(1e-3 * prefix[:, None, :, None] * (d + 1) + 0.3 * layer + 0.01 * pos) + 0.05 * layer * d


def fake_pooled(ids: np.ndarray) -> np.ndarray:
    return np.cos(1e-4 * ids.sum(axis=1, keepdims=True) * np.arange(1, POOLED + 1))


class FakeClip:
    def __init__(self):
        self.calls = []

    def __call__(self, name, inputs):
        ids = inputs["input_ids"].numpy()
        assert inputs["input_ids"].dtype == torch.int64 and ids.shape[1] == 77
        self.calls.append((name, ids.copy()))
        out = {"hidden_states": torch.from_numpy(fake_hidden(ids, L_DIM if name == TEXT_ENCODER_L else G_DIM)
                                                 .astype(np.float32))}
        if name == TEXT_ENCODER_G:
            out["text_embeds"] = torch.from_numpy(fake_pooled(ids).astype(np.float32))
        return out


def expected_encoding(ids_rows: list[list[int]], weights: list[list[float]], clip_skip: int = 2):
    """Fooocus's weighting, written out with loops in float64."""
    layer = -clip_skip
    ids = np.array(ids_rows)
    contexts = []
    for dim, pad in ((L_DIM, EOS), (G_DIM, 0)):
        rows = np.where(ids == PAD, pad, ids)
        z = fake_hidden(rows, dim)[:, layer].copy()
        if any(w != 1.0 for row in weights for w in row):
            empty = np.array([[BOS, EOS] + [pad] * 75])
            z_empty = fake_hidden(empty, dim)[0, layer]
            for k in range(len(rows)):
                original = z[k].mean()
                for j in range(77):
                    if weights[k][j] != 1.0:
                        z[k, j] = (z[k, j] - z_empty[j]) * weights[k][j] + z_empty[j]
                z[k] *= original / z[k].mean()
        contexts.append(z)
    context = np.concatenate(contexts, axis=-1).reshape(1, -1, L_DIM + G_DIM)
    return context, fake_pooled(np.where(ids == PAD, 0, ids))[:1]


def row(tokens, weights=None):
    weights = weights or [1.0] * len(tokens)
    return [BOS, *tokens, EOS] + [PAD] * (75 - len(tokens)), [1.0, *weights, 1.0] + [1.0] * (75 - len(tokens))


@pytest.mark.parametrize("text, tokens, weights, clip_skip", [
    ("ab cd", [97, 98, 99, 100], None, 2),
    ("ab cd", [97, 98, 99, 100], None, 1),
    ("ab (cd:1.5) ((e))", [97, 98, 99, 100, 101], [1, 1, 1.5, 1.5, 1.21], 2),
    ("(ab:0.5) c", [97, 98, 99], [0.5, 0.5, 1], 1),
    ("(ab:1.0) c", [97, 98, 99], None, 2),  # explicit 1.0: not weighted
])
def test_weighting_math(text, tokens, weights, clip_skip):
    models = FakeClip()
    context, pooled = encode_prompt(text, CharTokenizer(), models, clip_skip)
    ids, w = row(tokens, weights)
    want_context, want_pooled = expected_encoding([ids], [w], clip_skip)
    assert context.dtype == torch.float32 and context.shape == (1, 77, L_DIM + G_DIM)
    np.testing.assert_allclose(context.numpy(), want_context, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled.numpy(), want_pooled, rtol=1e-6)
    weighted = weights is not None
    assert [name for name, _ in models.calls] == [TEXT_ENCODER_L, TEXT_ENCODER_G]
    for (name, batch), pad in zip(models.calls, (EOS, 0)):
        assert batch.shape == ((2 if weighted else 1), 77)  # all chunks (+ the empty prompt) in one call
        if weighted:
            assert list(batch[1, :3]) == [BOS, EOS, pad] and set(batch[1, 2:]) == {pad}


def test_weighting_rescales_each_chunk_on_its_own():
    text = " ".join(["x"] * 74) + " (yz:1.3) w"  # "yz" does not fit: chunk 2 holds the weights
    models = FakeClip()
    context, _ = encode_prompt(text, CharTokenizer(), models)
    ids0, w0 = row([ord("x")] * 74)
    ids1, w1 = row([ord("y"), ord("z"), ord("w")], [1.3, 1.3, 1.0])
    want, _ = expected_encoding([ids0, ids1], [w0, w1])
    assert context.shape == (1, 154, L_DIM + G_DIM) and models.calls[0][1].shape == (3, 77)
    np.testing.assert_allclose(context.numpy(), want, rtol=1e-5, atol=1e-6)
    plain, _ = expected_encoding([ids0], [w0])
    np.testing.assert_array_equal(context[:, :77].numpy(), plain.astype(np.float32))  # untouched chunk


def test_workloads_concatenate_and_sum_the_first_top_k_pooled():
    tok, models = CharTokenizer(), FakeClip()
    texts = ["a", "bc", "(d:2)"]
    singles_ = [encode_prompt(t, tok, FakeClip()) for t in texts]
    context, pooled = encode_workloads(texts, 2, tok, models)
    torch.testing.assert_close(context, torch.cat([c for c, _ in singles_], dim=1))
    torch.testing.assert_close(pooled, singles_[0][1] + singles_[1][1])
    _, all3 = encode_workloads(texts, 3, tok, models)
    torch.testing.assert_close(all3, singles_[0][1] + singles_[1][1] + singles_[2][1])
    _, none = encode_workloads(texts, 0, tok, models)
    assert torch.count_nonzero(none) == 0 and none.shape == (1, POOLED)
    with pytest.raises(ValueError):
        encode_workloads([], 1, tok, models)


def test_encoder_caches_each_text():
    models = FakeClip()
    encoder = PromptEncoder(CharTokenizer(), models, clip_skip=2)
    first = encoder(["a", "b", "a"], 2)
    assert len(models.calls) == 4  # "a" and "b", two encoders each
    second = encoder(["b", "a"], 1)
    assert len(models.calls) == 4
    torch.testing.assert_close(second[0], torch.cat([first[0][:, 77:154], first[0][:, :77]], dim=1))
    encoder.clip_skip = 1
    encoder(["a"], 1)
    assert len(models.calls) == 6  # another layer is another entry


def test_plan_to_encoding_end_to_end():
    """A styled, multi-line plan encoded the way the pipeline does: expansion last, outside the pool."""
    p = plan("(fox:1.2)\nsnow", "blur", ["A", "Fooocus V2"]).with_expansion("fox, warm")
    models, tok = FakeClip(), CharTokenizer()
    cond, pooled = encode_workloads(p.positive_texts, p.positive_top_k, tok, models)
    uncond, pooled_neg = encode_workloads(p.negative_texts, p.negative_top_k, tok, models)
    assert p.positive_texts == ["a (fox:1.2) a", "snow", "fox, warm"] and p.positive_top_k == 2
    assert cond.shape[1] == 3 * 77 and uncond.shape[1] == 2 * 77
    torch.testing.assert_close(pooled, encode_prompt("a (fox:1.2) a", tok, models)[1]
                               + encode_prompt("snow", tok, models)[1])
    torch.testing.assert_close(pooled_neg, encode_prompt("na", tok, models)[1] + encode_prompt("blur", tok, models)[1])
