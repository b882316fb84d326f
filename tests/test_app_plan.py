"""The Train tab's estimate line: one estimator per base model, and on a GPU the plan the run will
follow (gradient checkpointing turned on when the run would not fit without it)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import app.run_plan as run_plan
from app.run_view import format_bytes
from app.studio import Studio
from trainer.config.presets import resolve_config

GiB = 1024**3
SDXL = SimpleNamespace(family="sdxl")  # what estimate_line reads of the architecture


def _config(**overrides):
    settings = {"base": "not-a-folder", "data": "x", "output": "x.safetensors", "resolution": 1024, "rank": 32,
                "targets": "attn", "train_text_encoder": False, "precision": "bf16", "device": "cuda", "steps": 100}
    return resolve_config(None, None, {**settings, **overrides})


@pytest.fixture
def studio(tmp_path: Path) -> Studio:
    return Studio.create(tmp_path / "projects")


def test_one_estimator_per_base_model(studio: Studio):
    assert studio.estimator("sd15") is studio.estimator("sd15")
    assert studio.estimator("sdxl") is not studio.estimator("sd15")


@pytest.mark.parametrize(("free_gib", "words", "checkpointed"), [
    (24, None, False),
    (12, "Gradient checkpointing turned on", True),
    (6, "may not fit", True),
])
def test_on_a_gpu_the_estimate_is_the_plan_the_run_will_follow(studio: Studio, monkeypatch, free_gib, words,
                                                                checkpointed):
    monkeypatch.setattr(run_plan, "gpu_free_bytes", lambda wanted: int(free_gib * GiB))
    config = _config()
    line = run_plan.estimate_line(studio, config, SDXL, 100, 20, 1024)
    expected_config = _config(grad_checkpointing=checkpointed)
    expected = studio.estimator("sdxl").estimate(expected_config, num_images=20, resolution=1024)
    memory = expected.peak_memory_bytes + expected.runtime_overhead_bytes
    assert f"about {format_bytes(memory)} of GPU memory" in line, line
    if words is None:
        assert "checkpointing" not in line
    else:
        assert words in line


def test_without_a_gpu_nothing_is_turned_on(studio: Studio, monkeypatch):
    monkeypatch.setattr(run_plan, "gpu_free_bytes", lambda wanted: None)
    line = run_plan.estimate_line(studio, _config(device="cpu", precision="fp32", resolution=512), SDXL, 100, 20, 512)
    assert "of RAM" in line and "checkpointing" not in line
