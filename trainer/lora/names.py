"""kohya/A1111 module names <-> (component, module path), for SD1, SD2 and SDXL.

A kohya key names a layer as prefix + module path with dots turned into underscores:
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k``. SD1/SD2 UNets keep
diffusers' paths; SDXL UNets use the SGM/LDM block numbering kohya trains on
(``down_blocks.i.attentions.j`` -> ``input_blocks.{3i+j+1}.1``, ``mid_block.attentions.0`` ->
``middle_block.1``, ``up_blocks.i.attentions.j`` -> ``output_blocks.{3i+j}.1``). Text encoders
are ``lora_te_`` (SD1/SD2) or ``lora_te1_``/``lora_te2_`` (SDXL) + ``text_model_`` + path.

Text-encoder paths are built from this fixed mapping, never from ``named_modules()``: newer
transformers drop the ``text_model.`` level inside ``CLIPTextModel`` (not inside
``CLIPTextModelWithProjection``), so paths here are *canonical*: relative to the CLIP text
transformer, without ``text_model.``. ``model_module_path`` finds the real path in a model.

Only the layers LoRA Studio trains and loads are mapped for SDXL's SGM numbering (the attention
blocks, and for LoCon the ResNet blocks' conv1/conv2/time_emb_proj/conv_shortcut as
``in_layers_2``/``out_layers_3``/``emb_layers_1``/``skip_connection`` and the samplers as
``input_blocks_N_0_op``/``output_blocks_N_2_conv``); other SGM names raise ``ValueError``. SD1/SD2 names of any layer parse, because the
path is diffusers' own and only the underscores need undoing.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

Family = Literal["sd1", "sd2", "sdxl"]
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")

_TE_PREFIX = {"sd1": "lora_te_", "sd2": "lora_te_"}
_SDXL_TE_PREFIX = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_PREFIX_COMPONENT = (  # longest first: "lora_te_" is not a prefix of "lora_te1_", but be explicit
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)
KOHYA_PREFIXES: tuple[str, ...] = tuple(p for p, _ in _PREFIX_COMPONENT)

# Module-name words that themselves contain underscores (diffusers UNet, SGM UNet, CLIP). Every
# other underscore in a kohya name was a dot. Longest sequences are tried first.
_COMPOUND_WORDS = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding",
    "input_blocks", "output_blocks", "middle_block",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "token_embedding", "position_embedding", "text_projection",
    "in_layers", "out_layers", "emb_layers", "skip_connection",  # SGM ResNet blocks (SDXL LoCon)
)
_COMPOUNDS = sorted((tuple(w.split("_")) for w in _COMPOUND_WORDS), key=len, reverse=True)

_DIFFUSERS_ATTN = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")
_DIFFUSERS_MID_ATTN = re.compile(r"^mid_block\.attentions\.0\.(.+)$")
_SGM_ATTN = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.1\.(.+)$")
_SGM_MID_ATTN = re.compile(r"^middle_block\.1\.(.+)$")
_DIFFUSERS_RESNET = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.resnets\.(\d+)\.(conv1|conv2|time_emb_proj|conv_shortcut)$")
_DIFFUSERS_MID_RESNET = re.compile(r"^mid_block\.resnets\.(\d+)\.(conv1|conv2|time_emb_proj|conv_shortcut)$")
_DIFFUSERS_SAMPLER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv$")
_SGM_RESNET = re.compile(r"^(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:0\.)?(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)$")
_SGM_SAMPLER = re.compile(r"^(?:input_blocks\.(\d+)\.0\.op|output_blocks\.(\d+)\.[12]\.conv)$")
# diffusers ResNet layer -> SGM (kohya's SDXL LoCon names)
_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection"}
_LAYERS_PER_BLOCK = 2  # SD1, SD2 and SDXL all have 2 (+1 down/up-sampler slot) per SGM block


def canonical_te_path(path: str) -> str:
    """A text-encoder module path without the optional leading ``text_model.``."""
    return path.removeprefix("text_model.")


def kohya_module_name(component: str, module_path: str, family: str) -> str:
    """The kohya key stem of one layer, e.g. ``lora_te1_text_model_encoder_layers_0_mlp_fc1``."""
    _check_family(family)
    if component == "unet":
        path = _sgm_path(module_path) if family == "sdxl" else module_path
        return "lora_unet_" + path.replace(".", "_")
    if component == "text_encoder":
        prefix = _SDXL_TE_PREFIX[component] if family == "sdxl" else _TE_PREFIX[family]
    elif component == "text_encoder_2":
        if family != "sdxl":
            raise ValueError(f"only SDXL has a second text encoder, not {family}")
        prefix = _SDXL_TE_PREFIX[component]
    else:
        raise ValueError(f"unknown component {component!r}; use one of {COMPONENTS}")
    return prefix + "text_model_" + canonical_te_path(module_path).replace(".", "_")


def parse_kohya_module_name(name: str) -> tuple[str, str]:
    """``lora_unet_…``/``lora_te…_`` stem -> (component, diffusers module path).

    UNet paths come back in diffusers naming (SGM block numbers are converted), text-encoder
    paths in canonical form (no ``text_model.``). Raises ValueError for names it cannot map.
    """
    for prefix, component in _PREFIX_COMPONENT:
        if name.startswith(prefix):
            break
    else:
        raise ValueError(f"{name!r} does not start with one of {', '.join(KOHYA_PREFIXES)}")
    dotted = _undo_underscores(name[len(prefix):])
    if component == "unet":
        return component, _diffusers_path(dotted)
    if not dotted.startswith("text_model."):
        raise ValueError(f"{name!r}: text-encoder names continue with 'text_model_'")
    return component, canonical_te_path(dotted)


def model_module_path(model: torch.nn.Module, component: str, path: str) -> str:
    """The path of ``path`` as ``model.named_modules()`` spells it (adds ``text_model.`` if needed)."""
    names = dict(model.named_modules())
    candidates = [path] if component == "unet" else [canonical_te_path(path), "text_model." + canonical_te_path(path)]
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise KeyError(f"{component} has no module {path!r}")


# --- helpers -------------------------------------------------------------------------------------


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; use one of {FAMILIES}")


def _undo_underscores(stem: str) -> str:
    tokens = stem.split("_")
    words: list[str] = []
    i = 0
    while i < len(tokens):
        for compound in _COMPOUNDS:
            if tuple(tokens[i:i + len(compound)]) == compound:
                words.append("_".join(compound))
                i += len(compound)
                break
        else:
            words.append(tokens[i])
            i += 1
    if any(word == "" for word in words):
        raise ValueError(f"malformed kohya name stem {stem!r} (empty part)")
    return ".".join(words)


def _sgm_path(path: str) -> str:
    """diffusers UNet path -> SGM path (SDXL kohya naming): attention, resnet and sampler blocks."""
    per_block = _LAYERS_PER_BLOCK + 1
    if m := _DIFFUSERS_ATTN.match(path):
        kind, block, attn, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "down_blocks":
            return f"input_blocks.{per_block * block + attn + 1}.1.{rest}"
        return f"output_blocks.{per_block * block + attn}.1.{rest}"
    if m := _DIFFUSERS_MID_ATTN.match(path):
        return f"middle_block.1.{m.group(1)}"
    if m := _DIFFUSERS_RESNET.match(path):
        kind, block, layer, part = m.group(1), int(m.group(2)), int(m.group(3)), _RESNET_PARTS[m.group(4)]
        index = per_block * block + layer + 1 if kind == "down_blocks" else per_block * block + layer
        return f"{'input' if kind == 'down_blocks' else 'output'}_blocks.{index}.0.{part}"
    if m := _DIFFUSERS_MID_RESNET.match(path):
        return f"middle_block.{2 * int(m.group(1))}.{_RESNET_PARTS[m.group(2)]}"
    if m := _DIFFUSERS_SAMPLER.match(path):  # SDXL's upsampling blocks all have attentions: slot 2
        block = int(m.group(2))
        if m.group(1) == "down_blocks":
            return f"input_blocks.{per_block * (block + 1)}.0.op"
        return f"output_blocks.{per_block * block + 2}.2.conv"
    raise ValueError(f"SDXL kohya names are mapped for the attention, resnet and sampler blocks, not {path!r}")


def _diffusers_path(path: str) -> str:
    """SGM path -> diffusers path; diffusers paths pass through."""
    per_block = _LAYERS_PER_BLOCK + 1
    if m := _SGM_ATTN.match(path):
        kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "input_blocks":
            if index < 1 or index % per_block == 0:
                raise ValueError(f"input_blocks.{index} has no attention block")
            block, attn = divmod(index - 1, per_block)
            return f"down_blocks.{block}.attentions.{attn}.{rest}"
        block, attn = divmod(index, per_block)
        return f"up_blocks.{block}.attentions.{attn}.{rest}"
    if m := _SGM_MID_ATTN.match(path):
        return f"mid_block.attentions.0.{m.group(1)}"
    if m := _SGM_RESNET.match(path):
        kind, index = m.group(1), int(m.group(2))
        part = {v: k for k, v in _RESNET_PARTS.items()}[m.group(3)]
        if kind == "middle_block":
            return f"mid_block.resnets.{index // 2}.{part}"
        block, layer = divmod(index - 1 if kind == "input_blocks" else index, per_block)
        return f"{'down' if kind == 'input_blocks' else 'up'}_blocks.{block}.resnets.{layer}.{part}"
    if m := _SGM_SAMPLER.match(path):
        if m.group(1) is not None:
            return f"down_blocks.{int(m.group(1)) // per_block - 1}.downsamplers.0.conv"
        return f"up_blocks.{int(m.group(2)) // per_block}.upsamplers.0.conv"
    if path.startswith(("input_blocks.", "output_blocks.", "middle_block.", "time_embed.", "label_emb.", "out.")):
        raise ValueError(f"SGM UNet names outside the attention blocks are not supported: {path!r}")
    return path
