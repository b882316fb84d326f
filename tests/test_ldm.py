"""The diffusers -> single-file (LDM/A1111) writer: exact round trips and the real key layout."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer.config.schema import ModelConfig
from trainer.models.demo import SD_SCHEDULER, TINY_SD1_TEXT, TINY_SD1_UNET, TINY_SD1_VAE
from trainer.models.family import BUNDLED_CONFIGS, TOKENIZER_DIR
from trainer.models.loading import load_base_model
from trainer.models.single_file import ldm_state_dict, save_single_file

ALL_FAMILIES = ("sd1", "sd2", "sdxl")


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])


def _assert_same_weights(original, loaded, parts: tuple[str, ...]) -> None:
    for part in parts:
        a, b = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys(), part
        for key in a:
            assert torch.equal(a[key].to(b[key].dtype), b[key]), f"{part}.{key}"


# --- tiny SD2 / SDXL built in code (SD1 comes from trainer.models.demo) ------------------------

def write_tiny_sd2(folder: Path) -> Path:
    """Tiny SD2-style model: linear proj_in/out, OpenCLIP-style (gelu) text encoder, v-prediction."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(10)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**{**TINY_SD1_UNET, "use_linear_projection": True, "attention_head_dim": (2, 4)}),
        vae=AutoencoderKL(**TINY_SD1_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**{**TINY_SD1_TEXT, "hidden_act": "gelu"})),
        tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token="!"),
        scheduler=DDIMScheduler.from_config({**SD_SCHEDULER, "prediction_type": "v_prediction", "clip_sample": False}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def write_tiny_sdxl(folder: Path) -> Path:
    """Tiny SDXL-style model: text_time embedding, two text encoders of different widths."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(20)
    te2 = {**TINY_SD1_TEXT, "hidden_size": 48, "intermediate_size": 96, "hidden_act": "gelu", "projection_dim": 16}
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16, norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=AutoencoderKL(**{**TINY_SD1_VAE, "scaling_factor": 0.13025}),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_SD1_TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**te2)),
        tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token="!"),
        scheduler=EulerDiscreteScheduler.from_config(SD_SCHEDULER),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folders(tiny_sd1_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ldm-models")
    return {"sd1": tiny_sd1_dir, "sd2": write_tiny_sd2(root / "tiny-sd2"), "sdxl": write_tiny_sdxl(root / "tiny-sdxl")}


# --- round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_round_trip_through_single_file(family: str, tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    original = load_base_model(ModelConfig(base=str(tiny_folders[family])), supported=ALL_FAMILIES)
    assert original.family == family
    path = save_single_file(original, tmp_path / f"{family}.safetensors", dtype=torch.float32)
    loaded = load_base_model(ModelConfig(base=str(path), base_config=str(tiny_folders[family])),
                             supported=ALL_FAMILIES)
    assert (loaded.family, loaded.prediction_type) == (family, original.prediction_type)
    parts = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ())
    _assert_same_weights(original, loaded, parts)


def test_default_dtype_is_fp16_and_loads_back(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    original = load_base_model(ModelConfig(base=str(tiny_folders["sd1"])))
    path = save_single_file(original, tmp_path / "half.safetensors")
    header = _header(path)
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes == {"F16", "I64"}  # I64: the CLIP position_ids buffer the original files carry
    assert header["__metadata__"]["modelspec.architecture"] == "stable-diffusion-v1"
    loaded = load_base_model(ModelConfig(base=str(path), base_config=str(tiny_folders["sd1"])))
    for key, value in original.unet.state_dict().items():
        assert torch.equal(value.half().float(), loaded.unet.state_dict()[key])


def test_v_prediction_marker_is_read_back(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    original = load_base_model(ModelConfig(base=str(tiny_folders["sd1"]), prediction_type="v_prediction"))
    path = save_single_file(original, tmp_path / "vpred.safetensors")
    assert "v_pred" in _header(path)
    loaded = load_base_model(ModelConfig(base=str(path), base_config=str(tiny_folders["sd1"])))
    assert loaded.prediction_type == "v_prediction"
    assert any("v_pred" in note for note in loaded.notes)


def test_components_without_family_are_detected(tmp_path: Path) -> None:
    from trainer.models.demo import build_tiny_sd1

    parts = build_tiny_sd1(seed=3)
    path = save_single_file(parts, tmp_path / "parts.safetensors")
    keys = set(_header(path)) - {"__metadata__"}
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)


def test_atomic_write_keeps_previous_file_on_failure(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    from trainer.models.demo import build_tiny_sd1

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous")
    broken = build_tiny_sd1()
    broken.unet.register_parameter("stray_weight", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match="stray_weight has no place"):
        save_single_file(broken, path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_model_with_lora_adapters_is_refused(tmp_path: Path) -> None:
    from peft import LoraConfig

    from trainer.core.errors import StudioError
    from trainer.models.demo import build_tiny_sd1

    parts = build_tiny_sd1()
    parts.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(StudioError, match="LoRA adapters"):
        save_single_file(parts, tmp_path / "x.safetensors")


# --- the real layout, at full size (meta tensors: no memory, no weights) ---------------------

def _full_size(family: str) -> SimpleNamespace:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = BUNDLED_CONFIGS[family]
    with init_empty_weights():
        return SimpleNamespace(
            family=family,
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            text_encoder_2=(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
                            if family == "sdxl" else None),
        )


# Tensor names and shapes as they appear in the published single files.
KNOWN_KEYS = {
    "sd1": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.encoder.norm_out.weight": (512,),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    },
}
# SD1.5 and SDXL 1.0 published files hold 1131 and 2515 tensors (SDXL's extra one is OpenCLIP's
# unused logit_scale); SD2's text encoder has 23 of OpenCLIP's 24 layers, as diffusers keeps them.
TENSOR_COUNTS = {"sd1": 1131, "sd2": 1214, "sdxl": 2514}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_full_size_layout_matches_original_files(family: str) -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    model = _full_size(family)
    ldm = ldm_state_dict(model)
    assert len(ldm) == TENSOR_COUNTS[family]
    for key, shape in KNOWN_KEYS[family].items():
        assert tuple(ldm[key].shape) == shape, key
    # diffusers' own reader maps every tensor back to where it came from
    for part, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        module = getattr(model, part)
        back = convert(ldm, dict(module.config))
        expected = module.state_dict()
        assert back.keys() == expected.keys(), part
        assert all(back[k].shape == expected[k].shape for k in back), part
