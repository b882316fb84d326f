"""Per-timestep weights of the diffusion loss, as kohya sd-scripts applies them.

Each weighting is a pure function of the timesteps' SNR = ᾱ/(1-ᾱ); ``timestep_weights`` multiplies
the ones a run turns on, in kohya's order (``train_network.post_process_loss``): min-SNR-γ,
scale-v-prediction-like-noise-prediction, v-prediction-like loss, debiased estimation. SNR is
capped at 1000 where kohya caps it (t = 0 would otherwise divide by ~0).
"""

from __future__ import annotations

import torch

from trainer.config.schema import TrainConfig
from trainer.core.errors import ConfigError

SNR_CAP = 1000.0


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR, or min(SNR, γ)/(SNR + 1) for v-prediction."""
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1) if v_prediction else clipped / snr_t


def v_pred_like_noise_pred_scale(snr_t: torch.Tensor) -> torch.Tensor:
    """SNR/(SNR + 1): the ratio of an epsilon loss to the v-prediction loss of the same error, so a
    v-prediction model's loss weighs timesteps as an epsilon model's would."""
    capped = torch.clamp(snr_t, max=SNR_CAP)
    return capped / (capped + 1)


def v_pred_like_loss_weight(snr_t: torch.Tensor, ratio: float) -> torch.Tensor:
    """kohya's ``loss + loss / scale · ratio`` as a factor: 1 + ratio·(SNR + 1)/SNR (epsilon models)."""
    return 1 + ratio / v_pred_like_noise_pred_scale(snr_t)


def debiased_weight(snr_t: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024): 1/sqrt(SNR), or 1/(SNR + 1) for v-prediction."""
    capped = torch.clamp(snr_t, max=SNR_CAP)
    return 1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped)


def timestep_weights(snr_t: torch.Tensor, v_prediction: bool, train: TrainConfig) -> torch.Tensor | None:
    """The product of the weightings ``train`` turns on, per sample; None when none is."""
    factors = []
    if train.min_snr_gamma:
        factors.append(min_snr_weight(snr_t, train.min_snr_gamma, v_prediction))
    if train.scale_v_pred_loss_like_noise_pred:
        factors.append(v_pred_like_noise_pred_scale(snr_t))
    if train.v_pred_like_loss:
        factors.append(v_pred_like_loss_weight(snr_t, train.v_pred_like_loss))
    if train.debiased_estimation:
        factors.append(debiased_weight(snr_t, v_prediction))
    if not factors:
        return None
    weights = factors[0]
    for factor in factors[1:]:
        weights = weights * factor
    return weights


def check_prediction_type_options(train: TrainConfig, prediction_type: str, model_name: str) -> None:
    """The two v-prediction scalings each make sense for one kind of model only."""
    if train.scale_v_pred_loss_like_noise_pred and prediction_type != "v_prediction":
        raise ConfigError(
            f"train.scale_v_pred_loss_like_noise_pred is for v-prediction models, but {model_name} predicts {prediction_type}.",
            hint="Turn it off (for an epsilon model, v_pred_like_loss adds a v-prediction-like term instead).")
    if train.v_pred_like_loss and prediction_type == "v_prediction":
        raise ConfigError(
            f"train.v_pred_like_loss is for epsilon models, but {model_name} predicts v_prediction already.",
            hint="Set v_pred_like_loss = 0 (scale_v_pred_loss_like_noise_pred is the v-prediction model's option).")
