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

from trainer.models.family import TOKENIZER_DIR

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


# --- SD 2.x and SDXL -------------------------------------------------------------------------------

# SD 2.x: Linear proj_in/proj_out (use_linear_projection) and an OpenCLIP-style text encoder
# (gelu, padded with "!") -- what the family detection keys on -- plus a v-prediction schedule
# like the 768 px SD 2.1 model.
TINY_SD2_UNET = dict(TINY_SD1_UNET, use_linear_projection=True)
TINY_SD2_TEXT = dict(TINY_SD1_TEXT, hidden_act="gelu")
SD2_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

# SDXL: the real block layout at toy widths. Three levels (no attention in the first), two
# layers per block and transformer depths (1, 1, 2) give the SGM block numbering of the real
# model (input_blocks 4, 5, 7, 8; middle_block 1; output_blocks 0-5) and blocks with more than
# one transformer. Encoders of widths 32 and 48 (different, as 768 and 1280 are: single-file
# loaders tell them apart by width) -> cross-attention width 80; the size/crop conditioning
# ("text_time") gets 6 time ids x 8 plus the second encoder's 48-wide projection.
TINY_SDXL_TIME_EMBED_DIM = 8
TINY_SDXL_TEXT_2 = dict(TINY_SD1_TEXT, hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=48)
TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=TINY_SD1_TEXT["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + TINY_SDXL_TEXT_2["projection_dim"],
    norm_num_groups=8,
)
TINY_SDXL_VAE = dict(TINY_SD1_VAE, scaling_factor=0.13025, force_upcast=True)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
)


@dataclass
class TinyXLComponents(TinyComponents):
    text_encoder_2: torch.nn.Module = None
    tokenizer_2: object = None


def _openclip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token="!")  # OpenCLIP pads with "!"


def build_tiny_sd2(seed: int = 0, prediction_type: str = "v_prediction") -> TinyComponents:
    """Build the tiny SD2-family model (v-prediction by default, like SD 2.1 768)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SD2_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_SD1_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SD2_TEXT))
    scheduler = DDIMScheduler(**{**SD2_SCHEDULER, "prediction_type": prediction_type})
    for module in (unet, vae, text_encoder):
        module.eval()
    return TinyComponents(unet, vae, text_encoder, _openclip_tokenizer(), scheduler)


def write_tiny_sd2(folder: str | Path, seed: int = 0, prediction_type: str = "v_prediction") -> Path:
    """Save the tiny SD2 model as a diffusers folder."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    parts = build_tiny_sd2(seed, prediction_type)
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sdxl(seed: int = 0, prediction_type: str = "epsilon") -> TinyXLComponents:
    """Build the tiny SDXL-family model (two text encoders, size/crop conditioning)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_SDXL_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SD1_TEXT))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_2))
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    scheduler = EulerDiscreteScheduler(**{**SDXL_SCHEDULER, "prediction_type": prediction_type})
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return TinyXLComponents(unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2, _openclip_tokenizer())


def write_tiny_sdxl(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Save the tiny SDXL model as a diffusers folder (model_index.json + seven components)."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    parts = build_tiny_sdxl(seed, prediction_type)
    pipe = StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=parts.scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
