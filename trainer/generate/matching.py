"""Matching a LoRA file to a loaded model's layers, and per-block multipliers.

Every kohya name of a file is looked up in the model's own layer index (built from
``named_modules`` through the fixed kohya naming), so a file for another architecture is refused
with the first misfit named, and layers the model lacks are reported instead of dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trainer.core.errors import ConfigError, LoraFileError
from trainer.generate.requests import BlockWeights
from trainer.lora.names import kohya_module_name
from trainer.lora.reading import LoraFile


@dataclass(frozen=True)
class LayerRef:
    """A layer LoRA can attach to: component, path as ``named_modules`` spells it, weight shape."""

    component: str
    path: str
    weight_shape: tuple[int, ...]


@dataclass(frozen=True)
class LoraMatch:
    targets: dict[str, LayerRef]  # kohya name -> layer
    unmatched: tuple[str, ...]  # kohya names this model has no layer for


def layer_index(model: Any) -> dict[str, LayerRef]:
    """kohya name -> layer, for every Linear/Conv2d of the model's UNet and text encoder(s)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    index: dict[str, LayerRef] = {}
    for component, module in model_components(model).items():
        skip_under = None
        for path, layer in module.named_modules():
            if skip_under is not None and path.startswith(skip_under):
                continue  # inside a peft wrapper: base_layer, lora_A, ...
            if isinstance(layer, BaseTunerLayer):
                skip_under, layer = path + ".", layer.get_base_layer()
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            try:
                name = kohya_module_name(component, path, model.family)
            except ValueError:  # e.g. SDXL layers outside the attention blocks: no kohya name
                continue
            index[name] = LayerRef(component, path, tuple(layer.weight.shape))
    return index


def match_lora(file: LoraFile, index: dict[str, LayerRef]) -> LoraMatch:
    """Which of the model's layers each module of ``file`` adds to; refuses shapes that do not fit."""
    targets: dict[str, LayerRef] = {}
    unmatched: list[str] = []
    misfits: list[str] = []
    for name, module in file.modules.items():
        ref = index.get(name)
        if ref is None:
            unmatched.append(name)
            continue
        out_features, in_features, *kernel = ref.weight_shape
        if hasattr(module, "down"):
            kernels = {tuple(module.down.shape[2:]), tuple(kernel)}
            kernel_fits = len(kernels) == 1 or kernels == {(), (1, 1)}  # a 1x1 conv is a Linear
            fits = module.up.shape[0] == out_features and module.down.shape[1] == in_features and kernel_fits
        else:  # LoHa/LoKr: (out, in·kh·kw)
            fits = module.out_in == (out_features, in_features * math.prod(kernel))
        if not fits:
            misfits.append(f"{name} is {_shape_text(module)} but the model's layer is {_layer_text(ref)}")
            continue
        targets[name] = ref
    if misfits:
        raise LoraFileError(
            f"The LoRA {file.path.name} does not fit this model: {misfits[0]}"
            + (f" (and {len(misfits) - 1} more layers)." if len(misfits) > 1 else "."),
            hint="It was made for a different base model; pick a LoRA trained on this model's architecture.")
    if not targets:
        raise LoraFileError(
            f"None of the {len(file.modules)} layers in {file.path.name} exist in this model "
            f"(e.g. {min(file.modules)}).",
            hint="The LoRA was made for another model architecture, or its layer names are in a style "
                 "LoRA Studio does not know.")
    return LoraMatch(targets, tuple(sorted(unmatched)))


def model_components(model: Any) -> dict[str, torch.nn.Module]:
    parts = {"unet": model.unet, "text_encoder": model.text_encoder}
    if getattr(model, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = model.text_encoder_2
    return parts


def lora_factors(module: Any, ref: LayerRef) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) in fp32 shaped for the layer: 4-D for a conv (a 1x1 stored as 2-D is fine), else 2-D."""
    down, up = module.down.float(), module.up.float()
    if len(ref.weight_shape) == 4:
        if down.dim() == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]
        return down, up
    return down.flatten(1), up.flatten(1)


def module_factors(module: Any, ref: LayerRef, base_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) in fp32 with up @ down = the layer's whole update ΔW (scale folded in), shaped for
    the layer as ``lora_factors``. LoRA/LoCon keep their rank; LoHa/LoKr use their exact low-rank
    form; DoRA's update depends on the base weight ``base_weight`` and is full-rank, so it comes as
    ΔW against an identity (rank min(out, in·kh·kw))."""
    if module.kind == "dora":
        delta = module.delta_weight(base_weight).flatten(1)
        out_features, fan_in = delta.shape
        down, up = (delta, torch.eye(out_features)) if out_features <= fan_in else (torch.eye(fan_in), delta)
    else:
        down, up = module.factors()
    down, up = down.flatten(1), up.flatten(1)
    if len(ref.weight_shape) == 4:
        return down.reshape(down.shape[0], *ref.weight_shape[1:]), up[:, :, None, None]
    return down, up


def transformer_blocks(unet: Any) -> tuple[list[str], list[str], list[str]]:
    """Module paths of the UNet's transformer containers: (down, mid, up), in LBW order."""
    down = [f"down_blocks.{i}.attentions.{j}" for i, block in enumerate(unet.down_blocks)
            for j in range(len(getattr(block, "attentions", None) or []))]
    mid = ["mid_block.attentions.0"] if getattr(unet.mid_block, "attentions", None) else []
    up = [f"up_blocks.{i}.attentions.{j}" for i, block in enumerate(unet.up_blocks)
          for j in range(len(getattr(block, "attentions", None) or []))]
    return down, mid, up


def lbw_vector(unet: Any, blocks: BlockWeights) -> tuple[float, ...]:
    """``blocks`` as an LBW vector for this UNet (BASE, down transformers, MID, up transformers)."""
    down, _mid, up = transformer_blocks(unet)
    if blocks.vector:
        expected = 1 + len(down) + 1 + len(up)
        if len(blocks.vector) != expected:
            raise ConfigError(
                f"Block weights need {expected} values for this model (BASE, {len(down)} down, MID, {len(up)} up), "
                f"not {len(blocks.vector)}.", hint="Or write them as down=W,mid=W,up=W.")
        return blocks.vector
    return (1.0, *[blocks.down] * len(down), blocks.mid, *[blocks.up] * len(up))


def block_multipliers(unet: Any, blocks: BlockWeights) -> Callable[[str], float]:
    """Module path -> multiplier of the UNet weight for that layer."""
    down, _mid, up = transformer_blocks(unet)
    vector = lbw_vector(unet, blocks)
    per_container = {**dict(zip(down, vector[1:1 + len(down)])), **dict(zip(up, vector[2 + len(down):]))}
    mid = vector[1 + len(down)]
    in_block = re.compile(r"^((?:down|up)_blocks\.\d+|mid_block)\.(?:(?:attentions|resnets)\.(\d+)\.)?")

    def multiplier(path: str) -> float:
        m = in_block.match(path)
        if m is None:
            return 1.0  # conv_in, time embedding, conv_out: outside every block
        block, layer = m.group(1), m.group(2)
        if block == "mid_block":
            return mid
        container = f"{block}.attentions.{layer}"
        if container in per_container:
            return per_container[container]  # a transformer, or a resnet of the same layer (LoCon)
        if blocks.vector:
            return 1.0  # LBW vectors only name transformer layers
        return blocks.down if block.startswith("down") else blocks.up

    return multiplier


def _shape_text(module: Any) -> str:
    if not hasattr(module, "down"):
        return f"{module.out_in[1]} -> {module.out_in[0]} ({module.kind})"
    kernel = "x".join(str(k) for k in module.down.shape[2:])
    return f"{module.down.shape[1]} -> {module.up.shape[0]}" + (f" ({kernel} conv)" if kernel else "")


def _layer_text(ref: LayerRef) -> str:
    out_features, in_features, *kernel = ref.weight_shape
    return f"{in_features} -> {out_features}" + (f" ({'x'.join(map(str, kernel))} conv)" if kernel else "")
