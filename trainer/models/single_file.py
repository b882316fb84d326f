"""Write diffusers components as one original-layout ("LDM", A1111/ComfyUI) checkpoint.

The single-file layout is the one Stability's original code saved and every UI reads:

    model.diffusion_model.*                       UNet  (input_blocks / middle_block / output_blocks)
    first_stage_model.*                           VAE   (encoder.down.N.block.M, mid.attn_1, ...)
    cond_stage_model.transformer.text_model.*     SD1 text encoder (Hugging Face CLIP names)
    cond_stage_model.model.*                      SD2 text encoder (OpenCLIP names, fused q/k/v)
    conditioner.embedders.0.transformer.text_model.*, conditioner.embedders.1.model.*   SDXL

The mapping is written from the layout itself: a table of (diffusers prefix -> LDM prefix) built
from the UNet/VAE config, plus per-layer renames. Every tensor must be claimed by the table; an
unmapped name is an error, never a silently dropped weight. ``models.load_base_model`` (through
diffusers' ``from_single_file``) reads these files back bit-identically at the same dtype.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.core.atomic import atomic_path
from trainer.core.errors import StudioError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."

# modelspec architecture ids (the Stability model-spec A1111/ComfyUI/kohya write into headers)
ARCHITECTURES = {
    ("sd1", "epsilon"): "stable-diffusion-v1",
    ("sd1", "v_prediction"): "stable-diffusion-v1",
    ("sd2", "epsilon"): "stable-diffusion-v2-512",
    ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
    ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base",
    ("sdxl", "v_prediction"): "stable-diffusion-xl-v1-base",
}

# Inside a UNet resnet block the two layouts name the same layers differently.
UNET_RESNET_RENAMES = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
VAE_RESNET_RENAMES = {"conv_shortcut.": "nin_shortcut."}
VAE_ATTENTION_RENAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


# --- UNet ------------------------------------------------------------------------------------

def unet_prefix_map(config: Mapping[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, renames inside it) for every block of a UNet2DConditionModel.

    LDM numbers the encoder's layers consecutively: input_blocks.0 is conv_in, then each level's
    resnet(+attention) layers, then its downsampler. The decoder has one more layer per level and
    its upsampler sits in the level's last layer, after the attention when there is one.
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    layers = config["layers_per_block"]
    layers = [layers] * len(down_types) if isinstance(layers, int) else list(layers)
    table: list[tuple[str, str, dict[str, str]]] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("add_embedding.linear_1.", "label_emb.0.0.", {}),
        ("add_embedding.linear_2.", "label_emb.0.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET_RENAMES),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET_RENAMES),
    ]
    index = 1
    for level, count in enumerate(layers):
        for j in range(count):
            table.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{index}.0.", UNET_RESNET_RENAMES))
            table.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{index}.1.", {}))
            index += 1
        if level < len(layers) - 1:
            table.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", {}))
            index += 1
    index = 0
    for level, count in enumerate(reversed(layers)):
        has_attention = "Attn" in up_types[level]
        for j in range(count + 1):
            table.append((f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{index}.0.", UNET_RESNET_RENAMES))
            table.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{index}.1.", {}))
            index += 1
        if level < len(layers) - 1:
            slot = 2 if has_attention else 1
            table.append((f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{index - 1}.{slot}.conv.", {}))
    return table


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers UNet tensors -> ``model.diffusion_model.*`` (attention internals keep their names)."""
    ldm = _apply_prefix_map(state_dict, unet_prefix_map(config), "UNet")
    return {UNET_PREFIX + key: value for key, value in ldm.items()}


# --- VAE -------------------------------------------------------------------------------------

def vae_prefix_map(config: Mapping[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    """The AutoencoderKL table: the decoder's up blocks are numbered in reverse in LDM."""
    levels = len(config["block_out_channels"])
    table: list[tuple[str, str, dict[str, str]]] = [
        ("quant_conv.", "quant_conv.", {}),
        ("post_quant_conv.", "post_quant_conv.", {}),
    ]
    for part in ("encoder", "decoder"):
        table += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}),
            (f"{part}.conv_out.", f"{part}.conv_out.", {}),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET_RENAMES),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET_RENAMES),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION_RENAMES),
        ]
    layers = int(config["layers_per_block"])
    for i in range(levels):
        for j in range(layers):
            table.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET_RENAMES))
        table.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}))
        ldm_level = levels - 1 - i
        for j in range(layers + 1):
            table.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{ldm_level}.block.{j}.", VAE_RESNET_RENAMES))
        table.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{ldm_level}.upsample.conv.", {}))
    return table


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers VAE tensors -> ``first_stage_model.*``; the mid attention's Linear layers become
    the 1x1 convolutions the original code used."""
    out = {}
    for ldm_key, value in _apply_prefix_map(state_dict, vae_prefix_map(config), "VAE").items():
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[VAE_PREFIX + ldm_key] = value
    return out


# --- text encoders ---------------------------------------------------------------------------

def clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str,
                max_position_embeddings: int | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP text model (SD1, SDXL's first encoder): same names under ``prefix``.

    transformers >= 5.6 has no ``text_model.`` level inside ``CLIPTextModel``; the file always has it.
    """
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key.startswith("text_projection."):
            raise ValueError(f"unexpected projection {key} in a CLIP-L text encoder")
        out[prefix + key] = value
    if max_position_embeddings:  # the original files carry this buffer; old loaders expect it
        out[prefix + "embeddings.position_ids"] = torch.arange(max_position_embeddings, dtype=torch.int64)[None]
    return out


OPEN_CLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
OPEN_CLIP_LAYER_RENAMES = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "self_attn.out_proj.": "attn.out_proj.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
OPEN_CLIP_TOP_RENAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP text model -> OpenCLIP names (SD2's encoder, SDXL's second).

    OpenCLIP keeps q, k and v as one ``in_proj`` matrix, and the projection as x @ P (the
    transpose of a Linear weight).
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key in OPEN_CLIP_TOP_RENAMES:
            out[prefix + OPEN_CLIP_TOP_RENAMES[key]] = value
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        match = OPEN_CLIP_LAYER.match(key)
        if match is None:
            raise ValueError(f"text encoder tensor {key} has no OpenCLIP name")
        layer, rest = int(match.group(1)), match.group(2)
        qkv = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if qkv:
            fused.setdefault((layer, qkv.group(2)), {})[qkv.group(1)] = value
            continue
        for old, new in OPEN_CLIP_LAYER_RENAMES.items():
            if rest.startswith(old):
                out[f"{prefix}transformer.resblocks.{layer}.{new}{rest[len(old):]}"] = value
                break
        else:
            raise ValueError(f"text encoder tensor {key} has no OpenCLIP name")
    for (layer, kind), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"text encoder layer {layer} lacks one of q/k/v {kind}")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# --- whole checkpoint ------------------------------------------------------------------------

def ldm_state_dict(model: Any, family: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of ``model`` (a BaseModel or anything with .unet/.vae/.text_encoder[_2]) in LDM layout."""
    family = family or _family_of(model)
    if any("lora_" in key for key in model.unet.state_dict()):
        raise StudioError("The model still carries LoRA adapters.",
                          hint="Merge them into the weights and unload the adapters before saving a checkpoint.")
    out = unet_to_ldm(model.unet.state_dict(), model.unet.config)
    out.update(vae_to_ldm(model.vae.state_dict(), model.vae.config))
    te = model.text_encoder
    te_positions = te.config.max_position_embeddings
    if family == "sd1":
        out.update(clip_to_ldm(te.state_dict(), SD1_TEXT_PREFIX, te_positions))
    elif family == "sd2":
        out.update(open_clip_to_ldm(te.state_dict(), SD2_TEXT_PREFIX))
    elif family == "sdxl":
        out.update(clip_to_ldm(te.state_dict(), SDXL_TEXT_PREFIX, te_positions))
        out.update(open_clip_to_ldm(model.text_encoder_2.state_dict(), SDXL_TEXT2_PREFIX))
    else:
        raise ValueError(f"unknown model family {family!r}")
    return out


def save_single_file(model: Any, path: str | Path, dtype: torch.dtype = torch.float16, *,
                     family: str | None = None, prediction_type: str | None = None,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` as an A1111/ComfyUI-loadable ``.safetensors`` checkpoint, atomically.

    Floating tensors are stored as ``dtype``. A v-prediction model gets ComfyUI's empty ``v_pred``
    marker so UIs that read it pick the right sampler parameterisation.
    """
    from safetensors.torch import save_file

    path = Path(path)
    family = family or _family_of(model)
    prediction_type = prediction_type or getattr(model, "prediction_type", None) or "epsilon"
    tensors = {key: _storable(value, dtype) for key, value in ldm_state_dict(model, family).items()}
    if prediction_type == "v_prediction":
        tensors["v_pred"] = torch.zeros(())
    header = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES[(family, prediction_type)],
        "modelspec.title": path.stem,
        "modelspec.prediction_type": prediction_type,
    }
    native = _native_resolution(model)
    if native:
        header["modelspec.resolution"] = f"{native}x{native}"
    header.update(metadata or {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


# --- helpers ---------------------------------------------------------------------------------

def _apply_prefix_map(state_dict: Mapping[str, torch.Tensor], table: list[tuple[str, str, dict[str, str]]],
                      what: str) -> dict[str, torch.Tensor]:
    # Longest prefix first, so "down_blocks.1.resnets.1." never claims "down_blocks.1.resnets.10.".
    ordered = sorted(table, key=lambda row: len(row[0]), reverse=True)
    out = {}
    for key, value in state_dict.items():
        for source, target, renames in ordered:
            if key.startswith(source):
                rest = key[len(source):]
                for old, new in renames.items():
                    if rest.startswith(old):
                        rest = new + rest[len(old):]
                        break
                out[target + rest] = value
                break
        else:
            raise ValueError(f"{what} tensor {key} has no place in the original checkpoint layout")
    return out


def _storable(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    value = value.detach().to("cpu")
    if value.is_floating_point():
        value = value.to(dtype)
    return value.contiguous()


def _family_of(model: Any) -> str:
    family = getattr(model, "family", None)
    if family:
        return family
    from trainer.models.family import detect_family_from_configs

    te_config = model.text_encoder.config.to_dict()
    return detect_family_from_configs(dict(model.unet.config), te_config,
                                      getattr(model, "text_encoder_2", None) is not None)


def _native_resolution(model: Any) -> int | None:
    try:
        return int(model.unet.config.sample_size) * 2 ** (len(model.vae.config.block_out_channels) - 1)
    except (AttributeError, TypeError):
        return None
