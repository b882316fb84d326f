"""What the forward diffusion adds to the latents, and at which timesteps.

Every draw comes from the run's noise generator on the CPU and then moves to the device, so a run
is the same under its seed on any device and a checkpoint holds the whole stream (the generator's
state). The formulas follow kohya sd-scripts (``library/custom_train_functions.py`` and
``train_util.get_noise_noisy_latents_and_timesteps``); logit-normal timesteps follow SD3 (Esser et
al. 2024) as OneTrainer samples them within a range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config.schema import TrainConfig
from trainer.train.transfers import to_device


def offset_noise(shape: torch.Size, strength: float, generator: torch.Generator) -> torch.Tensor:
    """One random value per sample and channel, broadcast over the image: lets the model learn
    overall brightness (very dark or bright images), which zero-mean noise never changes."""
    return strength * torch.randn((shape[0], shape[1], 1, 1), generator=generator)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """kohya's multires noise: add ``iterations`` levels of Gaussian noise drawn at resolutions
    shrinking by a random factor in [2, 4) per level, upsampled bilinearly and weighted
    ``discount**i``, then rescale to unit standard deviation.

    Level 0 is a second full-resolution draw; the loop ends early once a level is 1 pixel wide.
    Low-frequency noise lets the model change large areas (composition, colour), which plain
    per-pixel noise barely touches at most timesteps.
    """
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        factor = 2.0 + 2.0 * torch.rand((), generator=generator).item()
        hn, wn = max(1, int(h / factor**i)), max(1, int(w / factor**i))
        level = torch.randn((b, c, hn, wn), generator=generator)
        out += F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def sample_noise(latents: torch.Tensor, train: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The noise to add to ``latents``: Gaussian, plus the offset and the multires levels the run asks for."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if train.noise_offset:
        noise = noise + offset_noise(shape, train.noise_offset, generator)
    if train.multires_noise_iterations:
        noise = pyramid_noise(noise, train.multires_noise_iterations, train.multires_noise_discount, generator)
    return to_device(noise, latents.device).to(latents.dtype)


def noisy_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  ip_noise_gamma: float, generator: torch.Generator) -> torch.Tensor:
    """x_t, what the UNet sees. Input perturbation (Ning et al. 2023, kohya's ``ip_noise_gamma``) mixes
    ``noise + gamma·ξ`` into the latents while the target stays ``noise``: the model learns to
    undo slightly wrong inputs, as it meets them when sampling (exposure bias)."""
    if ip_noise_gamma:
        extra = to_device(torch.randn(noise.shape, generator=generator, dtype=torch.float32), noise.device)
        noise = noise + ip_noise_gamma * extra.to(noise.dtype)
    return scheduler.add_noise(latents, noise, timesteps)


def timestep_bounds(train: TrainConfig, num_train_timesteps: int) -> tuple[int, int]:
    """[low, high) of the training timesteps: the whole schedule for uniform sampling, else the
    configured range (kohya's min_timestep/max_timestep), clipped to the schedule."""
    if train.timestep_sampling == "uniform":
        return 0, num_train_timesteps
    high = min(train.max_timestep, num_train_timesteps)
    return min(train.min_timestep, high - 1), high


def logit_normal_timesteps(batch: int, low: int, high: int, mean: float, std: float,
                           generator: torch.Generator) -> torch.Tensor:
    """``low + floor(sigmoid(N(mean, std)) · (high - low))``: mid-range timesteps, where the image's
    content is decided, are drawn most often; the median is the middle of the range for mean 0."""
    u = torch.sigmoid(mean + std * torch.randn((batch,), generator=generator, dtype=torch.float64))
    return (low + u * (high - low)).long().clamp_(low, high - 1)


def sample_timesteps(batch: int, num_train_timesteps: int, train: TrainConfig, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """One training timestep per sample, as ``train.timestep_sampling`` says (integers in [low, high))."""
    low, high = timestep_bounds(train, num_train_timesteps)
    if train.timestep_sampling == "logit_normal":
        timesteps = logit_normal_timesteps(batch, low, high, train.logit_mean, train.logit_std, generator)
    else:  # uniform or range: kohya's torch.randint(min_timestep, max_timestep)
        timesteps = torch.randint(low, high, (batch,), generator=generator)
    return to_device(timesteps, device)
