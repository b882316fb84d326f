"""Host <-> device traffic of the training step (trainer.train.transfers).

Reading the loss back one step late (what the loop does on a GPU, so the GPU never waits for the
host) loses nothing: every step is reported once and in order, with the same numbers, a stop takes
effect at the step it was asked at, and a non-finite loss never reaches a checkpoint. Caches stay
on the device and the models they replace wait in host memory."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from tiny_runs import run_events

import trainer.train.loop as loop
from trainer.config.presets import resolve_config
from trainer.core.errors import TrainingError
from trainer.data.caches import LatentCache, TextEmbeddingCache
from trainer.train.checkpoints import list_checkpoints
from trainer.train.events import CheckpointSaved, RunFinished, StepProgress
from trainer.train.transfers import ParkedModules, StepReadback


def test_readings_come_back_lag_steps_late_in_order_and_drain_returns_the_rest():
    readback = StepReadback(torch.device("cpu"), lag=1)
    assert readback.push(1, torch.tensor([1.0]), "a") == []
    first = readback.push(2, torch.tensor([2.0]), "b")
    assert [(r.step, r.values.item(), r.context) for r in first] == [(1, 1.0, "a")]
    assert [r.step for r in readback.push(3, torch.tensor([3.0]))] == [2]
    assert [r.step for r in readback.drain()] == [3]
    assert readback.drain() == []


def test_a_cpu_reads_at_once():
    readback = StepReadback(torch.device("cpu"))
    assert readback.lag == 0
    assert [r.values.tolist() for r in readback.push(1, torch.tensor([0.5, 0.0]))] == [[0.5, 0.0]]


def _config(model: Path, data: Path, out: Path, **overrides):
    settings = dict(base=str(model), data=str(data), output=str(out / "lora.safetensors"), rank=4, alpha=2,
                    steps=5, seed=7, min_snr_gamma=0.0, save_every=2)
    settings.update(overrides)
    return resolve_config("character", overrides=settings)


def _lagged(monkeypatch) -> None:
    monkeypatch.setattr(loop, "StepReadback", functools.partial(StepReadback, lag=1))


def test_a_lagged_run_reports_every_step_once_with_the_same_losses(tiny_sd1_dir: Path, image_folder: Path,
                                                                  tmp_path: Path, monkeypatch):
    at_once = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "a"))
    _lagged(monkeypatch)
    lagged = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "b"))

    def progress(events):
        return [(e.step, e.loss) for e in events if isinstance(e, StepProgress)]

    assert [step for step, _ in progress(lagged)] == [1, 2, 3, 4, 5]
    assert [loss for _, loss in progress(lagged)] == pytest.approx([loss for _, loss in progress(at_once)])
    # a checkpoint is announced after the progress of its step (the pending reading is drained first)
    kinds = [(type(e).__name__, e.step) for e in lagged if isinstance(e, (StepProgress, CheckpointSaved))]
    assert kinds.index(("CheckpointSaved", 2)) > kinds.index(("StepProgress", 2))
    assert isinstance(lagged[-1], RunFinished) and lagged[-1].step == 5


def test_a_lagged_run_stops_at_the_step_the_stop_was_asked_at(tiny_sd1_dir: Path, image_folder: Path,
                                                             tmp_path: Path, monkeypatch):
    _lagged(monkeypatch)
    events = run_events(_config(tiny_sd1_dir, image_folder, tmp_path, steps=8), stop_after=3)
    finished = events[-1]
    # step 3's progress comes out while step 4 runs: the run stops after step 4, and says so
    assert finished.stopped_early and finished.step == 4
    assert [e.step for e in events if isinstance(e, StepProgress)] == [1, 2, 3, 4]
    assert [c.step for c in list_checkpoints(tmp_path / "lora_run" / "checkpoints")][-1] == 4


def test_a_lagged_non_finite_loss_never_reaches_a_checkpoint(tiny_sd1_dir: Path, image_folder: Path,
                                                            tmp_path: Path, monkeypatch):
    _lagged(monkeypatch)
    original, calls = loop.diffusion_loss, {"n": 0}

    def nan_at_step_4(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(loop, "diffusion_loss", nan_at_step_4)
    steps = []
    with pytest.raises(TrainingError, match="The loss became nan at step 4"):
        for event in loop.train(_config(tiny_sd1_dir, image_folder, tmp_path, steps=6)):
            if isinstance(event, StepProgress):
                steps.append(event.step)
    assert steps == [1, 2, 3]
    # step 4 is a checkpoint step; its loss is read before the checkpoint is written, so only step 2's exists
    assert [c.step for c in list_checkpoints(tmp_path / "lora_run" / "checkpoints")] == [2]


class _Recorder(torch.nn.Module):
    """Stands in for a VAE / text encoder: records where it is sent instead of moving."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def to(self, device):  # noqa: D102 - records the move
        self.log.append(f"{self.name}->{torch.device(device).type}")
        return self


def test_parked_modules_leave_the_gpu_and_come_back_only_for_sampling():
    log: list[str] = []
    parked = ParkedModules([_Recorder("vae", log), _Recorder("te", log)], torch.device("cuda"))
    parked.park()
    parked.park()  # parking twice moves nothing twice
    assert log == ["vae->cpu", "te->cpu"] and parked.parked
    log.clear()
    with pytest.raises(RuntimeError, match="sampling failed"), parked.on_device():
        assert log == ["vae->cuda", "te->cuda"] and not parked.parked
        raise RuntimeError("sampling failed")
    assert log == ["vae->cuda", "te->cuda", "vae->cpu", "te->cpu"] and parked.parked, "parked again after an error"


def test_on_a_cpu_nothing_is_parked_or_moved():
    log: list[str] = []
    parked = ParkedModules([_Recorder("vae", log)], torch.device("cpu"))
    parked.park()
    with parked.on_device():
        pass
    assert log == [] and not parked.parked


def test_caches_keep_their_entries_and_new_ones_on_the_device_they_were_moved_to(tmp_path: Path):
    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()
    pixels = torch.rand(3, 16, 16) * 2 - 1

    def load():
        return pixels, (0, 0), (16, 16)

    latents = LatentCache(vae, tmp_path / "cache")
    first = latents.get("a" * 64, (16, 16), False, load)
    assert first.latents.device.type == "cpu"
    latents.to(torch.device("meta"))  # "meta" stands in for a GPU: a device other than the host
    assert latents.get("a" * 64, (16, 16), False, load).latents.device.type == "meta"
    assert latents.get("b" * 64, (16, 16), False, load).latents.device.type == "meta", "a new entry lands there too"
    on_disk = LatentCache(vae, tmp_path / "cache")
    on_disk.to(torch.device("meta"))
    assert on_disk.get("a" * 64, (16, 16), False, load).latents.device.type == "meta" and on_disk.encoded == 0

    text = TextEmbeddingCache(lambda captions: (torch.ones(len(captions), 2, 3), torch.ones(len(captions), 3)))
    text.get_batch(["a cat"])
    text.to(torch.device("meta"))
    hidden, pooled = text.get_batch(["a cat", "a dog"])
    assert hidden.device.type == pooled.device.type == "meta" and hidden.shape == (2, 2, 3)


@pytest.mark.parametrize(("settings", "idle"), [
    ({}, ["vae", "text_encoder"]),  # every input cached: both wait in host memory on a GPU
    ({"train_text_encoder": True}, ["vae"]),  # a trained text encoder runs every step
    ({"shuffle_captions": True}, ["vae"]),  # captions change every step: not cacheable
    ({"cache_latents": False, "cache_text": False}, []),
])
def test_the_modules_a_session_parks_are_those_whose_outputs_are_all_cached(
        tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path, settings: dict, idle: list[str]):
    from trainer.train.session import open_session

    config = _config(tiny_sd1_dir, image_folder, tmp_path, **{"train_text_encoder": False, **settings})
    session = open_session(config, lambda level, text: None)
    model = session.model
    names = {id(model.vae): "vae", id(model.text_encoder): "text_encoder"}
    assert [names[id(m)] for m in session.idle_encoders.modules] == idle
