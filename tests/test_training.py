"""The engine end to end on the tiny model: it learns, it exports what it learned, it resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import run_events

from trainer.config.presets import resolve_config
from trainer.core.errors import CheckpointError, StudioError
from trainer.data.caches import encode_latents
from trainer.models.text import encode_text, tokenize
from trainer.train.events import (
    CheckpointSaved,
    Notice,
    RunFinished,
    RunStarted,
    SamplesMade,
    StepProgress,
)


def _config(model: Path, data: Path, out: Path, **overrides):
    settings = dict(base=str(model), data=str(data), output=str(out / "lora.safetensors"), rank=4, alpha=2,
                    steps=6, seed=7, min_snr_gamma=0.0)
    settings.update(overrides)
    return resolve_config("character", overrides=settings)


def _eval_loss(pipe, data: Path, seed: int = 0) -> float:
    """Denoising loss of a pipeline's UNet+TE on the training images at fixed noise/timesteps."""
    images = sorted(data.glob("*.png"))
    from trainer.data.images import load_image

    pixels = torch.stack([torch.from_numpy(__import__("numpy").array(load_image(p))).permute(2, 0, 1).float() / 127.5 - 1
                          for p in images])
    captions = [p.with_suffix(".txt").read_text() for p in images]
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        latents = encode_latents(pipe.vae, pixels)
        text = encode_text(pipe.text_encoder, tokenize(pipe.tokenizer, captions), 1)
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=g)
            timesteps = torch.full((len(images),), t)
            noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
            total += torch.nn.functional.mse_loss(pipe.unet(noisy, timesteps, text).sample, noise).item()
    return total / 5


def _pipeline(model_dir: Path, lora: Path | None = None):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="trained")
    return pipe


def test_training_learns_and_the_exported_file_carries_it(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path):
    """Would fail if the optimizer held the wrong params, B never moved, or alpha/r were lost at export."""
    config = _config(tiny_sd1_dir, image_folder, tmp_path, steps=60, lr=3e-3, te_lr=3e-3, targets="full", rank=8, alpha=4,
                     sample_every=0)
    events = run_events(config)
    finished = events[-1]
    assert isinstance(finished, RunFinished) and not finished.stopped_early
    base_loss = _eval_loss(_pipeline(tiny_sd1_dir), image_folder)
    lora_loss = _eval_loss(_pipeline(tiny_sd1_dir, finished.output), image_folder)
    assert lora_loss < 0.9 * base_loss, (base_loss, lora_loss)

    tensors = load_file(finished.output)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.count_nonzero(u) > 0 for u in ups), "every B must have moved away from zero"
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors)
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if k.endswith(".weight"))
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {4.0}

    # the smoothed loss the user watches goes down too
    progress = [e for e in events if isinstance(e, StepProgress)]
    assert len(progress) == 60 and progress[-1].step == 60 and progress[-1].eta_s == 0
    assert progress[-1].smoothed_loss < progress[4].smoothed_loss


def test_events_samples_checkpoints_and_run_folder(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path):
    config = _config(tiny_sd1_dir, image_folder, tmp_path, steps=4, save_every=2, sample_every=2, keep_last=1,
                     sample_steps=2, sample_prompts=["zxq, portrait", "zxq, full body"], trigger="zxq")
    events = run_events(config)
    started = next(e for e in events if isinstance(e, RunStarted))
    assert (started.total_steps, started.start_step, started.num_images) == (4, 0, 8)
    samples = [e for e in events if isinstance(e, SamplesMade)]
    assert [s.step for s in samples] == [2, 4] and all(len(s.paths) == 2 for s in samples)
    from PIL import Image

    with Image.open(samples[-1].paths[0]) as img:
        assert img.size == (64, 64)
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [2, 4]
    run_dir = started.run_dir
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000004"]  # keep_last=1
    assert (run_dir / "config.toml").is_file() and "8 images" in (run_dir / "dataset-report.txt").read_text()
    assert any(isinstance(e, Notice) and "Latents ready" in e.text for e in events)


def test_stop_then_resume_matches_an_uninterrupted_run(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path):
    common = dict(steps=8, lr=2e-3, flip=True, shuffle_captions=True, caption_dropout=0.2, batch_size=2)
    straight = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "a", **common))[-1]

    interrupted = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "b", **common), stop_after=3)[-1]
    assert interrupted.stopped_early and interrupted.step == 3
    resumed_events = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "b", resume="auto", **common))
    assert next(e for e in resumed_events if isinstance(e, RunStarted)).start_step == 3
    resumed = resumed_events[-1]
    assert resumed.step == 8 and not resumed.stopped_early

    a, b = load_file(straight.output), load_file(resumed.output)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-4)


def test_a_finished_run_can_be_extended_with_more_steps(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path):
    common = dict(lr=2e-3, scheduler="constant", batch_size=2)
    straight = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "a", steps=6, **common))[-1]
    first = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "b", steps=4, **common))[-1]
    assert first.step == 4 and not first.stopped_early
    extended = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "b", steps=6, resume="auto", **common))
    assert next(e for e in extended if isinstance(e, RunStarted)).start_step == 4
    assert any(isinstance(e, Notice) and "planned for 4 steps and now runs to 6" in e.text for e in extended)
    assert extended[-1].step == 6
    a, b = load_file(straight.output), load_file(extended[-1].output)
    for key in a:  # a constant learning rate: 4 + 2 steps are exactly the 6-step run
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-4)


def test_resume_refuses_a_checkpoint_of_another_config(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path):
    run_events(_config(tiny_sd1_dir, image_folder, tmp_path, steps=2))
    with pytest.raises(CheckpointError, match="different config or dataset"):
        run_events(_config(tiny_sd1_dir, image_folder, tmp_path, steps=2, rank=8, resume="auto"))
    with pytest.raises(CheckpointError, match="No checkpoint folder"):
        run_events(_config(tiny_sd1_dir, image_folder, tmp_path, steps=2, resume=str(tmp_path / "nope")))


def test_missing_dataset_is_a_clear_error(tiny_sd1_dir: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StudioError, match="0 images"):
        run_events(_config(tiny_sd1_dir, empty, tmp_path))


def test_gradient_checkpointing_trades_compute_not_results(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path):
    """Checkpointing (UNet and text encoder) recomputes activations; the trained weights must not change."""
    plain = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "plain", steps=3, lr=1e-3))[-1]
    checkpointed = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "ckpt", steps=3, lr=1e-3,
                                grad_checkpointing=True))[-1]
    a, b = load_file(plain.output), load_file(checkpointed.output)
    assert a.keys() == b.keys() and any(k.startswith("lora_te_") for k in a)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-5)


def test_a_compiled_unet_trains_to_the_same_weights(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path,
                                                     monkeypatch):
    """``compile = true`` compiles the UNet in place: same losses, same exported file, names unchanged.
    (aot_eager traces and compiles the graphs like inductor but skips code generation: seconds, not minutes.)"""
    import trainer.train.session as session_mod

    monkeypatch.setattr(session_mod, "COMPILE_BACKEND", "aot_eager")
    compiled_modules = []
    original_compile = torch.nn.Module.compile

    def recording_compile(module, *args, **kwargs):
        compiled_modules.append(type(module).__name__)
        return original_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", recording_compile)
    plain = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "plain", steps=3, lr=2e-3))
    assert compiled_modules == []
    compiled = run_events(_config(tiny_sd1_dir, image_folder, tmp_path / "compiled", steps=3, lr=2e-3, compile=True))
    assert compiled_modules == ["UNet2DConditionModel"]

    def losses(events):
        return [e.loss for e in events if isinstance(e, StepProgress)]

    assert losses(compiled) == pytest.approx(losses(plain), rel=1e-4)
    a, b = load_file(plain[-1].output), load_file(compiled[-1].output)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-4)
