"""The diffusion training objective: noise, timesteps, prediction target, loss weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data.masks import apply_mask
from trainer.train.transfers import to_device


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise like ``latents``; a per-channel offset helps very dark/bright images."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return to_device(noise, latents.device).to(latents.dtype)


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return to_device(torch.randint(0, num_train_timesteps, (batch,), generator=generator), device)


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon models) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    scheduler,
    timesteps: torch.Tensor,
    min_snr_gamma: float,
    *,
    mask: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean-squared error per sample, optionally min-SNR-gamma weighted (Hang et al. 2023).

    ``mask`` ([B, 1, h, w], masked loss) weights each latent pixel before the per-sample mean;
    ``sample_weights`` ([B], reg pictures' prior_loss_weight) each sample before the batch
    mean, which is a plain mean as in kohya (not divided by the weights' sum).
    """
    per_element = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = apply_mask(per_element, mask).mean(dim=(1, 2, 3))
    if min_snr_gamma:
        ratio = snr(scheduler, timesteps)
        weights = torch.clamp(ratio, max=min_snr_gamma) / ratio
        if scheduler.config.prediction_type == "v_prediction":
            weights = torch.clamp(ratio, max=min_snr_gamma) / (ratio + 1)
        per_sample = per_sample * weights
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    return per_sample.mean()
