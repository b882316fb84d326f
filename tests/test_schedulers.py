"""Sampler names as artists type them map to the right diffusers scheduler, configured from the model."""

from __future__ import annotations

import pytest

from trainer.core.errors import ConfigError
from trainer.generate.schedulers import make_scheduler, parse_sampler, sampler_names
from trainer.models.demo import SD_SCHEDULER

CONFIG = {**SD_SCHEDULER, "_class_name": "PNDMScheduler"}


@pytest.mark.parametrize(("name", "sampler", "schedule"), [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("dpmpp_2m_karras", "DPM++ 2M", "Karras"),
    ("dpmpp_2m", "DPM++ 2M", "Normal"),
    ("Euler a", "Euler a", "Automatic"),  # no schedule choice in diffusers
    ("euler_a", "Euler a", "Automatic"),
    ("k_euler_a", "Euler a", "Automatic"),
    ("  ddim ", "DDIM", "Automatic"),
    ("UniPC Exponential", "UniPC", "Exponential"),
])
def test_names_people_type(name, sampler, schedule):
    assert parse_sampler(name) == parse_sampler(sampler, schedule if schedule not in ("Normal", "Automatic") else None)
    choice = parse_sampler(name)
    assert (choice.sampler, choice.schedule) == (sampler, schedule)


@pytest.mark.parametrize(("name", "cls", "karras"), [
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", True),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", False),
    ("Euler a", "EulerAncestralDiscreteScheduler", None),
    ("DDIM", "DDIMScheduler", None),
])
def test_scheduler_keeps_the_models_betas_and_prediction_type(name, cls, karras):
    scheduler = make_scheduler(name, CONFIG, "v_prediction")
    assert type(scheduler).__name__ == cls
    assert scheduler.config.beta_end == SD_SCHEDULER["beta_end"]
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.prediction_type == "v_prediction"
    if karras is not None:
        assert scheduler.config.use_karras_sigmas is karras


def test_every_listed_name_parses_and_nonsense_is_refused():
    for name in sampler_names():
        make_scheduler(name, CONFIG)
    with pytest.raises(ConfigError, match="Unknown sampler 'fast'"):
        parse_sampler("fast")
    with pytest.raises(ConfigError, match="has no Karras schedule"):
        parse_sampler("DDIM Karras")
