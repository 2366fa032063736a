"""Output files and embedded metadata: what ends up on disk, what PIL reads back, and what
Fooocus's metadata readers would see."""
from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from frontend.files import OutputFiles, data_uri, encode_png, reencode, safe_stem
from pipeline import metadata as md

BASE = "http://127.0.0.1:8888"


@pytest.fixture
def files(tmp_path) -> OutputFiles:
    return OutputFiles(tmp_path / "out", BASE + "/")


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)


def request(**overrides) -> dict:
    base = {
        "prompt": "a cat, sitting\nsecond line",
        "negative_prompt": "blurry",
        "style_selections": ["Fooocus Enhance", "Fooocus V2", "Fooocus Sharp"],
        "performance_selection": "Speed",
        "aspect_ratios_selection": "1152*896",
        "guidance_scale": 4.0,
        "sharpness": 2.0,
        "base_model_name": "juggernautXL_v8Rundiffusion.safetensors",
        "refiner_model_name": "None",
        "refiner_switch": 0.5,
        "loras": [
            {"enabled": True, "model_name": "sd_xl_offset_example-lora_1.0.safetensors", "weight": 0.1},
            {"enabled": False, "model_name": "off.safetensors", "weight": 1.0},
            {"enabled": True, "model_name": "None", "weight": 1.0},
        ],
        "advanced_params": {},
    }
    base.update(overrides)
    return base


# pipeline/metadata.py


def test_fooocus_json_sorted_keys_and_values():
    info = md.image_info(request(), seed=8228839561385006000)
    text = md.fooocus_parameters(info)
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["seed"] == "8228839561385006000"
    assert data["resolution"] == "(1152, 896)"
    assert data["adm_guidance"] == "(1.5, 0.8, 0.3)"
    assert data["styles"] == "['Fooocus V2', 'Fooocus Enhance', 'Fooocus Sharp']"
    assert data["base_model"] == "juggernautXL_v8Rundiffusion"
    assert data["base_model_hash"] == ""
    assert data["refiner_model"] == "None" and "refiner_model_hash" not in data
    assert data["steps"] == 30 and data["guidance_scale"] == 4.0 and data["sharpness"] == 2.0
    assert data["clip_skip"] == 2 and "adaptive_cfg" not in data and "freeu" not in data
    assert data["sampler"] == "dpmpp_2m_sde_gpu" and data["scheduler"] == "karras"
    assert data["vae"] == "Default (model)"
    assert data["lora_combined_1"] == "sd_xl_offset_example-lora_1.0 : 0.1"
    assert "lora_combined_2" not in data
    assert data["loras"] == [["sd_xl_offset_example-lora_1.0", 0.1, ""]]
    assert data["full_prompt"] == ["a cat, sitting", "second line"]
    assert data["full_negative_prompt"] == ["blurry"]
    assert data["metadata_scheme"] == "fooocus" and data["version"] == "Fooocus v2.5.5"


def test_fooocus_json_optional_fields_and_pipeline_values():
    adv = {"adaptive_cfg": 5.0, "clip_skip": 1, "freeu_enabled": True, "overwrite_switch": 0.6,
           "refiner_swap_method": "vae", "sampler_name": "euler"}
    info = md.image_info(request(refiner_model_name="refiner.safetensors", advanced_params=adv), seed=7,
                         steps=12, full_prompt=["styled"], prompt_expansion="cat, detailed")
    data = json.loads(md.fooocus_parameters(info))
    assert data["adaptive_cfg"] == 5.0 and "clip_skip" not in data
    assert data["freeu"] == "(1.01, 1.02, 0.99, 0.95)"
    assert data["overwrite_switch"] == 0.6 and data["refiner_swap_method"] == "vae"
    assert data["refiner_model"] == "refiner" and data["refiner_model_hash"] == ""
    assert data["steps"] == 12 and data["sampler"] == "euler"
    assert data["full_prompt"] == ["styled"] and data["prompt_expansion"] == "cat, detailed"


def test_restricted_performance_forces_its_settings():
    info = md.image_info(request(performance_selection="Lightning", refiner_model_name="r.safetensors"), seed=1)
    assert info["steps"] == 4 and info["sampler"] == "euler" and info["scheduler"] == "sgm_uniform"
    assert info["guidance_scale"] == 1.0 and info["sharpness"] == 0.0 and info["adaptive_cfg"] == 1.0
    assert info["adm_guidance"] == (1.0, 1.0, 0.0)
    assert info["refiner_model"] == "None" and info["refiner_switch"] == 1.0
    assert info["loras"][-1] == ("sdxl_lightning_4step_lora.safetensors", 1.0)


def test_refiner_equal_to_base_is_off():
    info = md.image_info(request(refiner_model_name="juggernautXL_v8Rundiffusion.safetensors"), seed=1)
    assert info["refiner_model"] == "None"


@pytest.mark.parametrize("sampler, scheduler, label", [
    ("dpmpp_2m_sde_gpu", "karras", "DPM++ 2M SDE Karras"),
    ("dpmpp_2m_sde_gpu", "normal", "DPM++ 2M SDE"),
    ("euler", "karras", "Euler Karras"),  # Fooocus's exclusion list never matches
    ("euler_ancestral", "sgm_uniform", "Euler a"),
    ("dpmpp_3m_sde_gpu", "karras", "dpmpp_3m_sde_gpu"),  # no label: the name, no " Karras"
])
def test_a1111_sampler_label(sampler, scheduler, label):
    assert md.a1111_sampler_label(sampler, scheduler) == label


def test_a1111_string_format():
    info = md.image_info(request(), seed=42, full_prompt=["a cat, sitting", "masterpiece"],
                         full_negative_prompt=["blurry", "ugly"])
    text = md.a1111_parameters(info)
    positive, negative, params = text.split("\n")
    assert positive == "a cat, sitting, masterpiece"
    assert negative == "Negative prompt: blurry, ugly"
    assert params.startswith("Steps: 30, Sampler: DPM++ 2M SDE Karras, Seed: 42, Size: 1152x896, "
                             "CFG scale: 4.0, Sharpness: 2.0, ADM Guidance: \"(1.5, 0.8, 0.3)\", "
                             "Model: juggernautXL_v8Rundiffusion, Performance: Speed, Scheduler: karras, "
                             "VAE: Default (model), ")
    # the raw prompt has a comma and a newline: JSON-quoted so the line stays parseable
    assert 'Raw prompt: "a cat, sitting\\nsecond line", Raw negative prompt: blurry' in params
    assert "Clip skip: 2" in params
    assert 'Lora weights: "sd_xl_offset_example-lora_1.0: 0.1"' in params
    assert params.endswith("Version: Fooocus v2.5.5")
    assert "Model hash" not in params


def test_a1111_without_negative_prompt_has_no_negative_line():
    info = md.image_info(request(negative_prompt=""), seed=1)
    lines = md.a1111_parameters(info).split("\n")
    assert len(lines) == 2 and not lines[1].startswith("Negative prompt:")


def test_build_parameters_rejects_unknown_scheme():
    info = md.image_info(request(), seed=1)
    assert md.build_parameters(info, "a1111").startswith("a cat")
    with pytest.raises(ValueError):
        md.build_parameters(info, "a111")


# frontend/files.py: saving and embedding


def test_png_text_chunks(files, image):
    text = md.fooocus_parameters(md.image_info(request(prompt="日本の猫"), seed=3))
    saved = files.save(image, "job", 0, "png", metadata=text, scheme="fooocus")
    with Image.open(saved.path) as img:
        assert img.format == "PNG"
        assert img.text["parameters"] == text
        assert img.text["fooocus_scheme"] == "fooocus"
        assert json.loads(img.text["parameters"])["prompt"] == "日本の猫"
        assert np.array_equal(np.asarray(img), image)
    assert saved.data == saved.path.read_bytes()


def test_png_without_metadata_has_no_text(files, image):
    saved = files.save(image, "job", 1)
    with Image.open(saved.path) as img:
        assert "parameters" not in img.text and "fooocus_scheme" not in img.text


@pytest.mark.parametrize("ext, fmt", [("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
@pytest.mark.parametrize("scheme", ["fooocus", "a1111"])
def test_exif_round_trip(files, image, ext, fmt, scheme):
    info = md.image_info(request(prompt="a cat, ünïcode"), seed=5)
    text = md.build_parameters(info, scheme)
    saved = files.save(image, "job", 0, ext, metadata=text, scheme=scheme)
    assert saved.path.name == f"job-0.{ext}" and saved.ext == ext
    with Image.open(saved.path) as img:
        assert img.format == fmt
        exif = img.getexif()
        # Pillow writes the str tags as ASCII and reads them back as str
        comment = exif[0x9286]
        assert exif[0x0131] == md.FOOOCUS_VERSION
        assert exif[0x927C] == scheme
    if scheme == "fooocus":
        assert comment == text  # ASCII-escaped JSON: lossless
        assert json.loads(comment)["prompt"] == "a cat, ünïcode"
    else:
        assert comment == text.encode("ascii", "replace").decode()  # as in Fooocus: non-ASCII -> '?'


def test_jpeg_without_metadata_has_no_exif(files, image):
    saved = files.save(image, "job", 0, "jpeg")
    with Image.open(saved.path) as img:
        assert 0x9286 not in img.getexif()


def test_jpeg_metadata_too_big_for_exif_is_dropped(files, image):
    saved = files.save(image, "job", 0, "jpg", metadata="x" * 70000)
    with Image.open(saved.path) as img:
        assert img.format == "JPEG" and 0x9286 not in img.getexif()


def test_save_layout_url_and_atomic_write(files, image):
    saved = files.save(image, "my name", 2, "webp")
    date = saved.path.parent.name
    assert saved.path.parent.parent == files.root
    assert saved.url == f"{BASE}/files/{date}/my%20name-2.webp"
    assert files.lookup(date, "my name-2.webp") == saved.path
    assert [p.name for p in saved.path.parent.iterdir()] == ["my name-2.webp"]  # no temp file left
    again = files.save(image[::-1].copy(), "my name", 2, "webp")  # same name: replaced
    assert again.path == saved.path and again.path.read_bytes() == again.data


def test_save_rejects_bad_extension_and_unsafe_stem(files, image):
    with pytest.raises(ValueError):
        files.save(image, "job", 0, "gif")
    with pytest.raises(ValueError):
        files.save(image, "../escape", 0)
    assert not (files.root.parent / "escape-0.png").exists()


def test_data_uri_mime_types():
    assert data_uri(b"x", "png").startswith("data:image/png;base64,")
    assert data_uri(b"x", "jpg").startswith("data:image/jpeg;base64,")
    assert data_uri(b"x", "jpeg").startswith("data:image/jpeg;base64,")
    assert data_uri(b"x", "webp").startswith("data:image/webp;base64,")
    assert base64.b64decode(data_uri(b"abc").split(",", 1)[1]) == b"abc"


def test_encode_png_decodes_to_the_image(image):
    with Image.open(io.BytesIO(encode_png(image))) as img:
        assert img.format == "PNG" and np.array_equal(np.asarray(img), image)


# safe_stem


@pytest.mark.parametrize("save_name, stem", [
    ("../../etc/passwd", "etcpasswd"),
    ("a/b", "ab"),
    ("a\\b", "ab"),
    (".hidden", "hidden"),
    ("..", "JOB"),
    ("ok-name", "ok-name"),
    ("my picture v1.2", "my picture v1.2"),
    ("a..b", "a.b"),
    ("", "JOB"),
    (None, "JOB"),
    ("日本", "JOB"),
    ("_-x", "x"),
    ("x" * 300, "x" * 100),
])
def test_safe_stem(save_name, stem):
    assert safe_stem(save_name, "JOB") == stem
    assert OutputFiles.safe_stem(save_name, "JOB") == stem


def test_every_safe_stem_is_served(files, image):
    for name in ["../../etc/passwd", ".hidden", "a b", "x" * 300, "-lead"]:
        saved = files.save(image, safe_stem(name, "JOB"), 0)
        assert files.lookup(saved.path.parent.name, saved.path.name) == saved.path


# lookup


def test_lookup_refuses_traversal(files, image, tmp_path):
    saved = files.save(image, "job", 0)
    date = saved.path.parent.name
    (tmp_path / "secret.png").write_bytes(b"secret")
    for d, n in [("..", "secret.png"), (date, "../secret.png"), (date, "..%2Fsecret.png"),
                 ("2024-01-01/..", "secret.png"), (date, ".job-0.png"), (date, "job-0.txt"),
                 (date, "missing-0.png"), ("20240101", "job-0.png")]:
        assert files.lookup(d, n) is None, (d, n)
    assert files.lookup(date, "job-0.png") == saved.path


def test_lookup_refuses_symlink_out_of_root(files, image, tmp_path):
    saved = files.save(image, "job", 0)
    (tmp_path / "outside.png").write_bytes(encode_png(image))
    os.symlink(tmp_path / "outside.png", saved.path.parent / "link-0.png")
    assert files.lookup(saved.path.parent.name, "link-0.png") is None


# reencode (GET /files)


@pytest.mark.parametrize("accept, fmt, mime", [
    ("image/png", "PNG", "image/png"),
    ("image/jpg", "JPEG", "image/jpeg"),
    ("image/jpeg", "JPEG", "image/jpeg"),
    ("image/webp", "WEBP", "image/webp"),
    ("IMAGE/WEBP; q=1", "WEBP", "image/webp"),
])
def test_reencode_to_accept(files, image, accept, fmt, mime):
    text = md.fooocus_parameters(md.image_info(request(), seed=9))
    saved = files.save(image, "job", 0, "png", metadata=text)
    data, media = reencode(saved.path, accept)
    assert media == mime
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == fmt and img.size == (32, 24)
        carried = img.text.get("parameters") if fmt == "PNG" else img.getexif().get(0x9286)
        assert carried == text  # the metadata survives the conversion


@pytest.mark.parametrize("accept", [None, "", "*/*", "image/*", "text/html,image/webp,*/*;q=0.8", "image/gif"])
def test_reencode_other_accept_returns_file_as_is(files, image, accept):
    saved = files.save(image, "job", 0, "webp")
    assert reencode(saved.path, accept) == (saved.path.read_bytes(), "image/webp")


def test_reencode_same_format_is_unchanged(files, image):
    saved = files.save(image, "job", 0, "jpg", metadata="m")
    assert reencode(saved.path, "image/jpeg") == (saved.data, "image/jpeg")
    assert OutputFiles.reencode(saved.path, "image/png")[1] == "image/png"


# delete_results


def test_delete_results(files, image, tmp_path):
    a = files.save(image, "job", 0)
    b = files.save(image, "job", 1, "jpg")
    outside = tmp_path / "keep.png"
    outside.write_bytes(b"x")
    other_base = a.url.replace(BASE, "http://elsewhere:9999")
    results = [{"url": other_base, "seed": "1"}, b.url, {"url": None}, None,
               {"url": f"{BASE}/files/../keep.png"}, f"{BASE}/files/{a.path.parent.name}/..%2F..%2Fkeep.png"]
    assert files.delete_results(results) == 2
    assert not a.path.exists() and not b.path.exists() and outside.exists()
    assert files.delete_results([a.url]) == 0
