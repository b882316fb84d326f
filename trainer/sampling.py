"""Sample images during training: fixed prompts and seeds, so successive samples are comparable."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from trainer.events import SamplesMade
from trainer.models import inference_pipeline


def sample_prompts(session) -> tuple[str, ...]:
    prompts = session.config.output.sample_prompts
    if prompts:
        return prompts
    trigger = session.config.data.trigger
    return (trigger or session.training_set.items[0].caption,)


def make_samples(session, step: int) -> SamplesMade:
    """Render each sample prompt with the LoRA as it is now and save PNGs under ``run_dir/samples``."""
    cfg = session.config
    unwrap = session.accelerator.unwrap_model
    unet, text_encoder = unwrap(session.model.unet), unwrap(session.model.text_encoder)
    pipe = inference_pipeline(replace(session.model, unet=unet, text_encoder=text_encoder), "dpmpp_2m")
    pipe.set_progress_bar_config(disable=True)
    folder = session.run_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = sample_prompts(session)
    paths: list[Path] = []
    was_training = (unet.training, text_encoder.training)
    unet.eval()
    text_encoder.eval()
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
        unet.train(was_training[0])
        text_encoder.train(was_training[1])
    return SamplesMade(step, tuple(paths), tuple(prompts))
