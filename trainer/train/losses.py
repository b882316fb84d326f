"""The diffusion training objective: prediction target, loss per latent value, and its reduction.

Noise and timesteps are drawn in ``trainer.train.noise``; the per-timestep weights (min-SNR-γ,
debiased estimation, v-prediction scalings) live in ``trainer.train.loss_weighting``. The loss
variants and kohya's Huber threshold schedules follow sd-scripts (``train_util.conditional_loss``,
``get_huber_threshold_if_needed``; Khrapov et al. 2024, "Improving diffusion models' data-corruption
resistance using scheduled pseudo-Huber loss").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.config.schema import TrainConfig
from trainer.data.masks import apply_mask
from trainer.train.loss_weighting import snr, timestep_weights

HUBER_LOSSES = ("huber", "smooth_l1")


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon models) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def huber_threshold(schedule: str, huber_c: float, huber_scale: float, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """kohya's threshold c(t) of the pseudo-Huber loss, one per sample ([B], float32).

    - constant:    c = huber_c · huber_scale
    - exponential: c = exp(-α t) · huber_scale with α = -ln(huber_c) / T (1 at t = 0, huber_c at t = T)
    - snr:         c = (1 - huber_c) / (1 + σ_t)² + huber_c with σ_t = sqrt((1 - ᾱ_t) / ᾱ_t)
                   (no huber_scale, as in kohya): near-L2 at clean steps, near-L1 at noisy ones.
    """
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if schedule == "exponential":
        return torch.exp(-(-math.log(huber_c) / num_train_timesteps) * t) * huber_scale
    if schedule == "snr":
        alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigma = ((1.0 - alpha_bar) / alpha_bar).sqrt()
        return (1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c
    raise ValueError(f"unknown Huber schedule {schedule!r}")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
                     threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of every latent value (no reduction); ``threshold`` [B] is c of the Huber losses.

    huber:     2c·(sqrt((p - y)² + c²) - c)   (≈ (p-y)² for small errors, 2c·|p-y| for large ones)
    smooth_l1: 2·(sqrt((p - y)² + c²) - c)    (the same curve without the factor c)
    """
    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if loss_type in HUBER_LOSSES:
        if threshold is None:
            raise ValueError(f"the {loss_type} loss needs a threshold per sample")
        c = threshold.view(-1, *([1] * (prediction.ndim - 1)))
        pseudo = torch.sqrt((prediction - target) ** 2 + c**2) - c
        return 2 * c * pseudo if loss_type == "huber" else 2 * pseudo
    raise ValueError(f"unknown loss type {loss_type!r}")


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, scheduler, timesteps: torch.Tensor,
                   train: TrainConfig, *, mask: torch.Tensor | None = None,
                   sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's loss: ``train.loss`` per value, mean per sample, times the per-timestep weights
    (kohya's order: loss → mean over C,H,W → weightings), then the mean over the batch.

    ``mask`` ([B, 1, h, w], masked loss) weights each latent value before the per-sample mean;
    ``sample_weights`` ([B], reg pictures' prior_loss_weight) each sample before the batch
    mean, which is a plain mean as in kohya (not divided by the weights' sum).
    """
    threshold = None
    if train.loss in HUBER_LOSSES:
        threshold = huber_threshold(train.huber_schedule, train.huber_c, train.huber_scale, timesteps,
                                    scheduler.alphas_cumprod, scheduler.config.num_train_timesteps)
    values = elementwise_loss(prediction.float(), target.float(), train.loss, threshold)
    per_sample = apply_mask(values, mask).mean(dim=tuple(range(1, values.ndim)))
    weights = timestep_weights(snr(scheduler, timesteps), scheduler.config.prediction_type == "v_prediction", train)
    if weights is not None:
        per_sample = per_sample * weights
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    return per_sample.mean()
