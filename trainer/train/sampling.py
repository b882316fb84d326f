"""Sample images during training: fixed prompts and seeds, so successive samples are comparable.

The prompts are ``output.sample_prompts`` (lines or a kohya-syntax ``.txt`` file,
``trainer.generate.prompt_file``); each line keeps its own seed (else ``sample_seed`` + its index),
size, CFG, steps and sampler for the whole run, so every epoch's picture of a line differs only
by the LoRA. ``step-NNNNNN-I.png`` is line I at step NNNNNN.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from trainer.generate.pipeline import inference_pipeline
from trainer.generate.prompt_file import SamplePrompt, sample_prompt_list
from trainer.generate.schedulers import make_scheduler, parse_sampler
from trainer.train.ema import averaged
from trainer.train.events import SamplesMade

DEFAULT_CFG = 7.5  # diffusers' pipeline default, which samples used before prompts could set it


def sample_prompts(session) -> tuple[str, ...]:
    return tuple(p.prompt for p in run_sample_prompts(session))


def run_sample_prompts(session) -> list[SamplePrompt]:
    """The run's sample prompts with every setting filled in (raises ConfigError on a bad line)."""
    out = session.config.output
    prompts = sample_prompt_list(out.sample_prompts)
    if not prompts:
        trigger = session.config.data.trigger
        prompts = [SamplePrompt(trigger or session.training_set.items[0].caption)]
    sampler = parse_sampler(out.sampler).label
    return [p.with_defaults(seed=out.sample_seed + index, width=session.resolution, height=session.resolution,
                            cfg=DEFAULT_CFG, steps=out.sample_steps, sampler=sampler)
            for index, p in enumerate(prompts)]


def make_samples(session, step: int) -> SamplesMade:
    """Render each sample prompt with the LoRA as it is now and save PNGs under ``run_dir/samples``."""
    prompts = run_sample_prompts(session)
    images = render_in_training(session, prompts)
    folder = session.run_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index, image in enumerate(images):
        path = folder / f"step-{step:06d}-{index}.png"
        image.save(path)
        paths.append(path)
    return SamplesMade(step, tuple(paths), tuple(p.prompt for p in prompts))


def render_in_training(session, prompts: list[SamplePrompt]) -> list:
    """PIL images of ``prompts`` (settings filled in) with the weights as they are now."""
    # The encoders were parked once the caches were full (the pipeline needs them); a run with an EMA
    # shows the averaged weights, as its exported file will hold them.
    with session.idle_encoders.on_device(), averaged(session.ema):
        return _render(session, prompts)


def _render(session, prompts: list[SamplePrompt]) -> list:
    cfg = session.config
    unwrap = session.accelerator.unwrap_model
    unet, text_encoder = unwrap(session.model.unet), unwrap(session.model.text_encoder)
    text_encoder_2 = None if session.model.text_encoder_2 is None else unwrap(session.model.text_encoder_2)  # SDXL
    model = replace(session.model, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    pipe = inference_pipeline(model, prompts[0].sampler)
    pipe.set_progress_bar_config(disable=True)
    modules = [m for m in (unet, text_encoder, text_encoder_2) if m is not None]
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    images = []
    try:
        for prompt in prompts:
            pipe.scheduler = make_scheduler(prompt.sampler, model.scheduler_config, model.prediction_type)
            generator = torch.Generator("cpu").manual_seed(prompt.seed)  # CPU noise: the same picture on any device
            with torch.no_grad(), session.accelerator.autocast():
                images.append(pipe(prompt.prompt, negative_prompt=prompt.negative or None,
                                   num_inference_steps=prompt.steps, guidance_scale=prompt.cfg, generator=generator,
                                   height=prompt.height, width=prompt.width,
                                   clip_skip=cfg.model.clip_skip - 1 or None).images[0])
    finally:
        for module, mode in zip(modules, was_training):
            module.train(mode)
    return images
