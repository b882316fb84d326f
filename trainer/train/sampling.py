"""Sample images during training: fixed prompts and seeds, so successive samples are comparable."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from trainer.generate.pipeline import inference_pipeline
from trainer.train.ema import averaged
from trainer.train.events import SamplesMade


def sample_prompts(session) -> tuple[str, ...]:
    prompts = session.config.output.sample_prompts
    if prompts:
        return prompts
    trigger = session.config.data.trigger
    return (trigger or session.training_set.items[0].caption,)


def make_samples(session, step: int) -> SamplesMade:
    """Render each sample prompt with the LoRA as it is now and save PNGs under ``run_dir/samples``."""
    # The encoders were parked once the caches were full (the pipeline needs them); a run with an EMA
    # shows the averaged weights, as its exported file will hold them.
    with session.idle_encoders.on_device(), averaged(session.ema):
        return _render_samples(session, step)


def _render_samples(session, step: int) -> SamplesMade:
    cfg = session.config
    unwrap = session.accelerator.unwrap_model
    unet, text_encoder = unwrap(session.model.unet), unwrap(session.model.text_encoder)
    text_encoder_2 = None if session.model.text_encoder_2 is None else unwrap(session.model.text_encoder_2)  # SDXL
    pipe = inference_pipeline(replace(session.model, unet=unet, text_encoder=text_encoder,
                                      text_encoder_2=text_encoder_2), "dpmpp_2m")
    pipe.set_progress_bar_config(disable=True)
    folder = session.run_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = sample_prompts(session)
    paths: list[Path] = []
    modules = [m for m in (unet, text_encoder, text_encoder_2) if m is not None]
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        for index, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(cfg.output.sample_seed + index)
            with torch.no_grad(), session.accelerator.autocast():
                image = pipe(prompt, num_inference_steps=cfg.output.sample_steps, generator=generator,
                             height=session.resolution, width=session.resolution,
                             clip_skip=cfg.model.clip_skip - 1 or None).images[0]
            path = folder / f"step-{step:06d}-{index}.png"
            image.save(path)
            paths.append(path)
    finally:
        for module, mode in zip(modules, was_training):
            module.train(mode)
    return SamplesMade(step, tuple(paths), tuple(prompts))
