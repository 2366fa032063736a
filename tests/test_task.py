"""Request -> generation settings: presets, seeds, sizes (Fooocus's rules)."""
from __future__ import annotations

import random

import pytest

from pipeline import presets
from pipeline.task import GenerationTask, parse_aspect_ratio, resolve_seed


@pytest.mark.parametrize("performance,steps", [("Quality", 60), ("Speed", 30), ("Extreme Speed", 8),
                                                ("Lightning", 4), ("Hyper-SD", 4)])
def test_performance_steps(performance, steps):
    assert GenerationTask(performance_selection=performance).steps == steps


def test_overwrite_step_and_size():
    task = GenerationTask(advanced_params={"overwrite_step": 12, "overwrite_width": 640, "overwrite_height": -1})
    assert task.steps == 12 and task.size == (640, 896)


def test_defaults_are_fooocus_defaults():
    task = GenerationTask.from_dict({"prompt": "a cat"})
    assert task.size == (1152, 896) and task.steps == 30
    assert (task.sampler, task.scheduler, task.cfg, task.clip_skip) == ("dpmpp_2m_sde_gpu", "karras", 4.0, 2)


def test_unknown_sampler_and_scheduler_fall_back_to_defaults():
    task = GenerationTask(advanced_params={"sampler_name": "nope", "scheduler_name": "nope"})
    assert (task.sampler, task.scheduler) == (presets.DEFAULT_SAMPLER, presets.DEFAULT_SCHEDULER)


def test_restricted_performance_overrides_sampling_settings():
    task = GenerationTask(performance_selection="Lightning", guidance_scale=9.0,
                          advanced_params={"sampler_name": "dpmpp_2m", "scheduler_name": "karras"})
    assert (task.sampler, task.scheduler, task.cfg) == ("euler", "sgm_uniform", 1.0)
    task.validate()  # its LoRA is looked up by the pipeline, in the LoRA folder (tests/test_lora.py)


@pytest.mark.parametrize("value,expected", [("1152*896", (1152, 896)), ("896×1152", (896, 1152))])
def test_parse_aspect_ratio(value, expected):
    assert parse_aspect_ratio(value) == expected


@pytest.mark.parametrize("value", ["1152x896", "abc", "0*512", "512"])
def test_bad_aspect_ratio_is_a_value_error(value):
    with pytest.raises(ValueError, match="aspect_ratios_selection"):
        parse_aspect_ratio(value)


def test_sizes_must_fit_the_model():
    with pytest.raises(ValueError, match="multiple"):
        GenerationTask(aspect_ratios_selection="1000*1000").validate(size_multiple=32)
    with pytest.raises(ValueError, match="multiple"):
        GenerationTask(aspect_ratios_selection="1040*1024").validate(size_multiple=32)
    GenerationTask(aspect_ratios_selection="1024*1024").validate(size_multiple=32)


def test_seeds():
    rng = random.Random(0)
    assert resolve_seed(42) == 42 and resolve_seed("42") == 42
    for bad in (-1, -5, 2**63, None, ""):
        assert 0 <= resolve_seed(bad, rng) < 2**63
    assert GenerationTask(image_seed=2**63 - 1, image_number=2).image_seeds() == [2**63 - 1, 0]
    assert GenerationTask(image_seed=9, image_number=3,
                          advanced_params={"disable_seed_increment": True}).image_seeds() == [9, 9, 9]
