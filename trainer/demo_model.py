"""A tiny, randomly initialised Stable Diffusion 1.x model built in code.

Same architecture family as SD1.5 (UNet2DConditionModel with cross-attention, AutoencoderKL
with an 8x latent grid, CLIPTextModel with the real CLIP tokenizer) at toy sizes, so the whole
workflow runs offline with no download: the GUI's "demo model" (clearly labelled as making
noise) and every test use it. Deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).parent / "model_configs" / "clip_tokenizer"

# Tiny but structurally faithful: 8x VAE, 4 latent channels, cross-attention in the UNet's first
# down/last up block, conv proj_in/proj_out like SD1.5, quick_gelu CLIP text encoder.
TINY_SD1_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_SD1_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
)
TINY_SD1_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    set_alpha_to_one=False,
    steps_offset=1,
    skip_prk_steps=True,
)


@dataclass
class TinyComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object


def build_tiny_sd1(seed: int = 0, prediction_type: str = "epsilon") -> TinyComponents:
    """Build the tiny SD1-family model with weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SD1_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_SD1_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SD1_TEXT))
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    scheduler = PNDMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type})
    for module in (unet, vae, text_encoder):
        module.eval()
    return TinyComponents(unet, vae, text_encoder, tokenizer, scheduler)


def write_tiny_sd1(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save the tiny model as a diffusers folder (model_index.json + components)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    parts = build_tiny_sd1(seed, prediction_type)
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
