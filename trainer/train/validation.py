"""The validation loss: the plain MSE on held-out pictures at a *fixed* set of timesteps and noise.

The training loss is a different random (timestep, noise) draw every step, and its size depends
mostly on the timestep: its curve is noise around a flat line and cannot show over-fitting. Here
every evaluation uses the same timesteps (``VALIDATION_TIMESTEPS`` spread over the schedule) and
the same noise per picture (seeded from the run's seed), so two evaluations of the same weights
are identical and the curve is comparable across epochs and runs. The loss is always plain MSE
(no min-SNR or Huber weighting), so runs with different loss settings compare too.

Latents (and, with a frozen text encoder, caption embeddings) are encoded once, before the
encoders are parked; the evaluation runs the UNet in eval mode (no dropout), on the main process
only, with the EMA's average when there is one (what the files hold).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data.caches import encode_latents
from trainer.data.training_set import SampleRef, TrainingSet
from trainer.train.ema import averaged
from trainer.train.losses import prediction_target
from trainer.train.transfers import to_device

VALIDATION_TIMESTEPS = 4  # per picture: t = (k + 0.5)/K of the schedule, k = 0..K-1
NOISE_SEED_OFFSET = 90210  # the noise is seeded from train.seed + this, apart from training's streams


@dataclass
class _HeldOut:
    latents: torch.Tensor  # [K, C, h, w]: the picture's latents, once per timestep
    noise: torch.Tensor  # [K, C, h, w], fixed
    caption: str
    embeddings: tuple[torch.Tensor, torch.Tensor | None] | None  # cached when the text encoder is frozen
    time_ids: torch.Tensor | None  # SDXL [K, 6]


class ValidationSet:
    """The held-out pictures of a run, encoded once; ``loss(session)`` evaluates the weights now."""

    def __init__(self, session) -> None:
        cfg = session.config
        model = session.model
        pictures = TrainingSet(session.validation_scan, cfg.data, session.resolution,
                               bucket_step=model.resolution_multiple)
        self.num_pictures = len(pictures.items)
        schedule = model.noise_scheduler.config.num_train_timesteps
        self.timesteps = torch.tensor([int((k + 0.5) * schedule / VALIDATION_TIMESTEPS)
                                       for k in range(VALIDATION_TIMESTEPS)], device=session.device)
        generator = torch.Generator().manual_seed(cfg.train.seed + NOISE_SEED_OFFSET)
        frozen_text = "text_encoder" not in session.plan.modules
        self.items: list[_HeldOut] = []
        for index, bucket in enumerate(pictures.item_buckets):
            pixels, crop_top_left, original_size = pictures.load_pixels(SampleRef(index, bucket, False, slot=0))
            with torch.no_grad():
                latents = encode_latents(model.vae, pixels.unsqueeze(0)).float().cpu()
            noise = torch.randn((VALIDATION_TIMESTEPS, *latents.shape[1:]), generator=generator)
            caption = pictures.items[index].caption
            embeddings = None
            if frozen_text:
                with torch.no_grad():
                    embeddings = session.text_embeddings_for([caption])
            time_ids = None
            if model.family == "sdxl":
                time_ids = torch.tensor([[*original_size, *crop_top_left, bucket[1], bucket[0]]],
                                        dtype=torch.float32).repeat(VALIDATION_TIMESTEPS, 1)
            self.items.append(_HeldOut(latents.repeat(VALIDATION_TIMESTEPS, 1, 1, 1), noise, caption, embeddings,
                                       time_ids))

    def loss(self, session) -> float:
        """Mean MSE over pictures × timesteps with the weights as they are now."""
        unwrap = session.accelerator.unwrap_model
        modules = [unwrap(m) for m in session.trainable_models().values()]
        modes = [m.training for m in modules]
        for module in modules:
            module.eval()  # dropouts off: the same weights give the same number
        unet, scheduler = unwrap(session.model.unet), session.model.noise_scheduler
        total = 0.0
        try:
            with torch.no_grad(), averaged(session.ema), session.accelerator.autocast():
                for item in self.items:
                    latents, noise = to_device(item.latents, session.device), to_device(item.noise, session.device)
                    noisy = scheduler.add_noise(latents, noise, self.timesteps)
                    hidden, pooled = item.embeddings or _encode_unwrapped(session, item.caption)
                    hidden = hidden.expand(VALIDATION_TIMESTEPS, *hidden.shape[1:])
                    added = None
                    if pooled is not None:
                        added = {"text_embeds": pooled.expand(VALIDATION_TIMESTEPS, *pooled.shape[1:]),
                                 "time_ids": to_device(item.time_ids, session.device)}
                    prediction = unet(noisy, self.timesteps, hidden, added_cond_kwargs=added).sample
                    target = prediction_target(scheduler, latents, noise, self.timesteps)
                    total += torch.nn.functional.mse_loss(prediction.float(), target.float()).item()
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)
        return total / max(len(self.items), 1)


def _encode_unwrapped(session, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The caption through the trained text encoder(s), unwrapped: a DDP forward on the main process
    alone could wait for the others (buffer broadcast)."""
    from dataclasses import replace

    from trainer.train.session import encode_captions

    unwrap = session.accelerator.unwrap_model
    model = session.model
    model = replace(model, text_encoder=unwrap(model.text_encoder),
                    text_encoder_2=None if model.text_encoder_2 is None else unwrap(model.text_encoder_2))
    hidden, pooled = encode_captions(model, [caption], session.config.model.clip_skip)
    return to_device(hidden, session.device), None if pooled is None else to_device(pooled, session.device)


def validation_due(session, step: int) -> bool:
    """After ``step``: every ``validate_every`` steps, else whenever an epoch ends (and at the last step)."""
    every = session.config.output.validate_every
    if every:
        return step % every == 0 or step == session.total_steps
    return session.epoch_at(step) > session.epoch_at(step - 1) or step == session.total_steps
