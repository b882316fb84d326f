"""When the numbers go wrong (NaN/Inf loss, out of memory) the run stops at once, says why and
what to change, and keeps the last good checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import trainer.train.loop as loop
from trainer.config.presets import resolve_config
from trainer.core.errors import TrainingError
from trainer.train.checkpoints import list_checkpoints, load_checkpoint
from trainer.train.events import RunFinished, StepProgress


def _config(model: Path, data: Path, out: Path, **overrides):
    settings = dict(base=str(model), data=str(data), output=str(out / "lora.safetensors"), rank=4, alpha=2,
                    steps=6, seed=7, save_every=2, min_snr_gamma=0.0)
    settings.update(overrides)
    return resolve_config("character", overrides=settings)


def _steps_until_error(config) -> tuple[list[int], TrainingError]:
    steps = []
    with pytest.raises(TrainingError) as caught:
        for event in loop.train(config):
            if isinstance(event, StepProgress):
                steps.append(event.step)
    return steps, caught.value


def _fail_at_call(monkeypatch, name: str, call: int, make_failure):
    """Wrap ``trainer.train.loop.<name>`` so that its ``call``-th call returns/raises ``make_failure(result)``."""
    original = getattr(loop, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        result = original(*args, **kwargs)
        return make_failure(result) if calls["n"] == call else result

    monkeypatch.setattr(loop, name, wrapped)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_within_the_step_and_keeps_the_last_checkpoint(
        tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path, monkeypatch, bad: float):
    _fail_at_call(monkeypatch, "diffusion_loss", 3, lambda loss: loss * bad)
    config = _config(tiny_sd1_dir, image_folder, tmp_path)
    steps, error = _steps_until_error(config)
    assert steps == [1, 2], "no progress is reported for the step whose loss is not finite"
    assert f"The loss became {bad} at step 3" in str(error)
    assert "Lower the learning rate" in str(error) and "fp32/bf16" in str(error)
    checkpoints = list_checkpoints(tmp_path / "lora_run" / "checkpoints")
    assert [c.step for c in checkpoints] == [2]
    _, state = load_checkpoint(checkpoints[0].path)
    assert all(torch.isfinite(t).all() for t in state["lora"]["unet"].values())
    assert not (tmp_path / "lora.safetensors").exists(), "a diverged LoRA is never exported"

    # the kept checkpoint is usable: the same run resumes from it and finishes
    monkeypatch.undo()
    events = list(loop.train(_config(tiny_sd1_dir, image_folder, tmp_path, resume="auto")))
    assert isinstance(events[-1], RunFinished) and events[-1].step == 6


def test_a_learning_rate_far_too_high_ends_with_one_clear_line(tiny_sd1_dir: Path, image_folder: Path,
                                                               tmp_path: Path, capsys):
    from trainer.cli.main import main

    code = main(["train", "--base", str(tiny_sd1_dir), "--data", str(image_folder), "--rank", "4", "--steps", "6",
                 "--lr", "1e30", "--te-lr", "1e30", "--output", str(tmp_path / "lora.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: The loss became") and "Lower the learning rate" in line
    assert "Traceback" not in err
    assert not (tmp_path / "lora.safetensors").exists()


OOM_CASES = [
    ("cuda", lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 8.00 GiB total)")),
    ("cpu allocator", lambda: _real_cpu_allocation_failure()),
    ("mps", lambda: RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB)")),
]


def _real_cpu_allocation_failure() -> RuntimeError:
    try:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: refused by the allocator, nothing is allocated
    except RuntimeError as exc:
        return exc
    raise AssertionError("a 1 PiB allocation succeeded")


@pytest.mark.parametrize(("kind", "make_error"), OOM_CASES, ids=[c[0] for c in OOM_CASES])
def test_out_of_memory_names_the_settings_to_lower(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path,
                                                   monkeypatch, kind: str, make_error):
    def raise_oom(result):
        raise make_error()

    _fail_at_call(monkeypatch, "training_step", 3, raise_oom)
    steps, error = _steps_until_error(_config(tiny_sd1_dir, image_folder, tmp_path, batch_size=2))
    text = str(error)
    assert steps == [1, 2]
    assert "Ran out of" in text and "memory at step 3" in text
    for setting in ("resolution 64 px", "batch size 2", "rank 4", "gradient checkpointing off"):
        assert setting in text
    for fix in ("--grad-checkpointing", "--resolution", "--batch-size", "--rank"):
        assert fix in text
    assert [c.step for c in list_checkpoints(tmp_path / "lora_run" / "checkpoints")] == [2]


def test_out_of_memory_while_preparing_latents(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path, monkeypatch):
    from trainer.train.session import Session

    def warm_caches(self, notify):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    monkeypatch.setattr(Session, "warm_caches", warm_caches)
    _, error = _steps_until_error(_config(tiny_sd1_dir, image_folder, tmp_path, grad_checkpointing=True))
    assert "memory while preparing latents" in str(error)
    assert "gradient checkpointing on" in str(error) and "--grad-checkpointing" not in str(error)


def test_other_runtime_errors_are_not_mistaken_for_out_of_memory(tiny_sd1_dir: Path, image_folder: Path,
                                                                 tmp_path: Path, monkeypatch):
    def shape_bug(result):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    _fail_at_call(monkeypatch, "training_step", 1, shape_bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        list(loop.train(_config(tiny_sd1_dir, image_folder, tmp_path)))
