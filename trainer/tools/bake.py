"""Bake LoRAs into a base model: W ← W0 + Σ wᵢ·(αᵢ/rᵢ)·BᵢAᵢ, saved as one single-file checkpoint.

The sum is done in fp32 on the CPU, on the base model's own layers (found through the same
kohya-name index generation uses, so the same files are accepted and refused), then the model
is written in the original LDM layout by ``ldm.save_single_file``: A1111, ComfyUI and
diffusers' ``from_single_file`` load it as a plain checkpoint, no LoRA needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config.schema import ModelConfig
from trainer.core.errors import ConfigError
from trainer.core.output_paths import check_output_file
from trainer.generate.generator import lora_short_hash
from trainer.generate.matching import (
    block_multipliers,
    layer_index,
    match_lora,
    model_components,
    module_factors,
)
from trainer.generate.requests import LoraSpec
from trainer.lora.reading import check_lora_fits, read_lora_file
from trainer.lora.writing import EXPORT_DTYPES

# Header key naming the folder whose configs load this checkpoint (the base's own folder when it was
# one): a baked tiny or custom model is not among the bundled configs, and is then a base like any other.
BASE_CONFIG_KEY = "lora_studio.base_config"


@dataclass(frozen=True)
class BakedLora:
    name: str
    te_weight: float
    unet_weight: float
    layers: int
    unmatched: tuple[str, ...]
    short_hash: str


@dataclass(frozen=True)
class BakeReport:
    path: Path
    loras: tuple[BakedLora, ...]
    dtype: str

    def text(self) -> str:
        lines = [f"Wrote {self.path} ({self.dtype}) with:"]
        for lora in self.loras:
            weights = (f"{lora.unet_weight:g}" if lora.te_weight == lora.unet_weight
                       else f"te {lora.te_weight:g} / unet {lora.unet_weight:g}")
            lines.append(f"  {lora.name} at {weights}: {lora.layers} layers")
            if lora.unmatched:
                lines.append(f"    {len(lora.unmatched)} layers match nothing in this model and were skipped "
                             f"(e.g. {lora.unmatched[0]})")
        return "\n".join(lines)


def bake_loras(base: str, loras: Sequence[LoraSpec], out: str | Path, *, base_config: str = "",
               dtype: str = "fp16") -> BakeReport:
    """Load ``base``, add every enabled LoRA of ``loras`` into its weights and save ``out``."""
    from trainer.models.loading import load_base_model
    from trainer.models.single_file import save_single_file

    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"Unknown checkpoint dtype {dtype!r}.", hint=f"Use one of {', '.join(EXPORT_DTYPES)}.")
    if not any(spec.enabled for spec in loras):
        raise ConfigError("Give at least one LoRA to bake (--lora FILE:WEIGHT).")
    out = check_output_file(out, suffix=".safetensors", label="The checkpoint",
                            inputs=[("base model", base), *(("LoRA file", spec.path) for spec in loras)])
    model = load_base_model(ModelConfig(base=base, base_config=base_config), dtype=torch.float32,
                            supported=("sd1", "sd2", "sdxl"))
    baked = tuple(add_lora_to_weights(model, spec) for spec in loras if spec.enabled)
    metadata = {"lora_studio.baked_loras": json.dumps([
        {"name": b.name, "te": b.te_weight, "unet": b.unet_weight, "hash": b.short_hash} for b in baked])}
    config_folder = base_config or (base if Path(base).is_dir() else "")
    if config_folder:  # the configs a loader needs for this single file (a tiny or custom model is not bundled)
        metadata[BASE_CONFIG_KEY] = str(Path(config_folder).resolve())
    save_single_file(model, out, dtype=EXPORT_DTYPES[dtype], metadata=metadata)
    return BakeReport(out, baked, dtype)


def add_lora_to_weights(model: Any, spec: LoraSpec) -> BakedLora:
    """W += weight·(α/r)·B·A for every layer of ``spec``'s file that this model has (in place)."""
    file = read_lora_file(spec.path)
    check_lora_fits(file, model.family)
    match = match_lora(file, layer_index(model))
    components = model_components(model)
    multiplier = block_multipliers(model.unet, spec.blocks)
    with torch.no_grad():
        for name, ref in match.targets.items():
            module = file.modules[name]
            if ref.component == "unet":
                weight = spec.unet * multiplier(ref.path)
            else:
                weight = spec.te * spec.blocks.te
            layer = components[ref.component].get_submodule(ref.path)
            down, up = module_factors(module, ref, layer.weight.detach().float())  # any type, scale folded in
            delta = (up.flatten(1) @ down.flatten(1)).reshape(ref.weight_shape)
            layer.weight += (weight * delta).to(layer.weight.dtype)
    return BakedLora(Path(spec.path).stem, spec.te, spec.unet, len(match.targets), match.unmatched,
                     lora_short_hash(file))
