"""A diffusers txt2img pipeline over an already-loaded base model, with any A1111-named sampler.

Used by the Generate tab's ``Generator`` and by the training loop's samples, so both render with
the same components and schedulers (nothing is reloaded or copied).
"""

from __future__ import annotations

from typing import Any

from trainer.models.loading import BaseModel


def make_inference_scheduler(model: BaseModel, scheduler_name: str | None = None) -> Any:
    """A fresh sampling scheduler with the model's betas and prediction type.

    ``None`` uses the model's own scheduler class; otherwise any sampler name
    ``trainer.generate.schedulers`` accepts ("DPM++ 2M Karras", "Euler a", "dpmpp_2m", ...).
    """
    if scheduler_name is None:
        import diffusers

        scheduler_cls = getattr(diffusers, model.scheduler_config.get("_class_name", "PNDMScheduler"))
        return scheduler_cls.from_config(model.scheduler_config, prediction_type=model.prediction_type)
    from trainer.generate.schedulers import make_scheduler

    return make_scheduler(scheduler_name, model.scheduler_config, model.prediction_type)


def inference_pipeline(model: BaseModel, scheduler_name: str | None = None) -> Any:
    """A diffusers pipeline over the already-loaded components (nothing is reloaded or copied)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = make_inference_scheduler(model, scheduler_name)
    if model.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
            scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
