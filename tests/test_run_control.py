"""Latent cache reuse across runs, and the commands a client sends mid-run (save now, sample now)."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from trainer.config.presets import resolve_config
from trainer.train.events import (
    CheckpointSaved,
    Notice,
    RunCommands,
    SamplesMade,
    StepProgress,
)
from trainer.train.loop import train


def _config(model: Path, data: Path, out: Path, **overrides):
    settings = dict(base=str(model), data=str(data), output=str(out / "lora.safetensors"), rank=4, alpha=2,
                    steps=1, seed=3, train_text_encoder=False)
    settings.update(overrides)
    return resolve_config("character", overrides=settings)


def _newly_encoded(events) -> int:
    text = next(e.text for e in events if isinstance(e, Notice) and "Latents ready" in e.text)
    return int(re.search(r"\((\d+) newly encoded\)", text).group(1))


def test_latent_cache_is_reused_and_an_edited_image_is_reencoded(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path):
    config = _config(tiny_sd1_dir, image_folder, tmp_path)
    assert _newly_encoded(list(train(config))) == 8
    assert _newly_encoded(list(train(config))) == 0  # same images, same VAE: all from the disk cache
    edited = image_folder / "img03.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(edited)
    assert _newly_encoded(list(train(config))) == 1  # keyed by content hash, not by file name
    flipped = _config(tiny_sd1_dir, image_folder, tmp_path, flip=True)
    assert _newly_encoded(list(train(flipped))) == 8  # mirrored variants are new cache entries


def test_save_now_and_sample_now_act_once_at_the_end_of_the_current_step(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path):
    config = _config(tiny_sd1_dir, image_folder, tmp_path, steps=3, sample_steps=2)
    commands = RunCommands()
    events = []
    for event in train(config, commands):
        events.append(event)
        if isinstance(event, StepProgress) and event.step == 1:
            commands.save_now()
            commands.sample_now()
    saved = [e.step for e in events if isinstance(e, CheckpointSaved)]
    sampled = [e.step for e in events if isinstance(e, SamplesMade)]
    # requested while step 1 is being reported: handled right then (once), before step 2 starts
    assert saved == [1, 3] and sampled == [1]
    assert all(p.is_file() for e in events if isinstance(e, SamplesMade) for p in e.paths)
