"""Sample images during training: fixed prompts and seeds, so successive samples are comparable."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.events import SamplesMade


def sample_prompts(session) -> tuple[str, ...]:
    prompts = session.config.output.sample_prompts
    if prompts:
        return prompts
    trigger = session.config.data.trigger
    return (trigger or session.training_set.items[0].caption,)


def make_samples(session, step: int) -> SamplesMade:
    """Render each sample prompt with the LoRA as it is now and save PNGs under ``run_dir/samples``."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    model, cfg = session.model, session.config
    unwrap = session.accelerator.unwrap_model
    unet, text_encoder = unwrap(model.unet), unwrap(model.text_encoder)
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=text_encoder, tokenizer=model.tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
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
