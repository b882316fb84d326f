"""Exact LoRA file sizes before training, from a model's module shapes (no weights needed).

The architecture is built on the meta device from configs only (a diffusers folder's
``*/config.json``, or the bundled config of a single file's detected family), so sizing an
SDXL preset costs milliseconds, not a 7 GB load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config.presets import list_presets, resolve_config
from trainer.config.schema import NetworkConfig, StudioConfig
from trainer.core.errors import ModelLoadError
from trainer.lora.inject import plan_lora
from trainer.lora.writing import lora_file_size, lora_shapes
from trainer.models.family import (
    BUNDLED_CONFIGS,
    FAMILY_LABELS,
    detect_family_from_checkpoint_keys,
    detect_family_from_configs,
    read_safetensors_shapes,
)


@dataclass(frozen=True)
class Architecture:
    """A model's structure on the meta device: enough to plan LoRA and compute sizes."""

    family: str
    unet: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # "text_encoder" (and "text_encoder_2")
    label: str


@dataclass(frozen=True)
class PresetSize:
    name: str
    description: str
    rank: int
    alpha: float
    targets: str
    text_encoder: bool
    modules: int
    size_bytes: int
    base_label: str


def architecture_for(base: str | None, base_config: str | None = None) -> Architecture:
    """Meta-device UNet and text encoders of ``base`` (default: the SD 1.5 architecture)."""
    if not base:
        return _build(BUNDLED_CONFIGS["sd1"], "sd1", "SD 1.5")
    path = Path(base).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        has_te2 = bool((index.get("text_encoder_2") or [None])[0])
        unet_cfg = _read(path / "unet" / "config.json")
        family = detect_family_from_configs(unet_cfg, _read(path / "text_encoder" / "config.json"), has_te2)
        return _build(path, family, f"{path.name} ({FAMILY_LABELS[family]})")
    if path.is_file() and path.suffix == ".safetensors":
        family = detect_family_from_checkpoint_keys(read_safetensors_shapes(path))
        folder = Path(base_config) if base_config else BUNDLED_CONFIGS[family]
        return _build(folder, family, f"{path.name} ({FAMILY_LABELS[family]})")
    raise ModelLoadError(f"Cannot size presets for {base}: not a diffusers folder or .safetensors checkpoint.",
                         hint="Pass a local model path, or leave --base out for SD 1.5 sizes.")


def lora_size(config: StudioConfig | NetworkConfig, arch: Architecture, dtype: str = "fp16",
              metadata: dict[str, str] | None = None) -> tuple[int, int]:
    """(modules, exact bytes) of the file a run with this network config exports (with this header
    ``metadata``; without it, a typical small run's, see ``lora_file_size``)."""
    network = config.network if isinstance(config, StudioConfig) else config
    plan = plan_lora(network, arch.unet, arch.text_encoders)
    components = {"unet": arch.unet, **arch.text_encoders}
    kind = {"locon": "lora"}.get(network.network, network.network)
    shapes = [shape for component, paths in plan.modules.items()
              for shape in lora_shapes(component, components[component], paths, arch.family, kind,
                                       plan.ranks.get(component))]
    alpha = network.alpha * (network.rank ** 0.5 if network.rslora else 1.0)
    return len(shapes), lora_file_size(shapes, network.rank, dtype, alpha=alpha, metadata=metadata)


def preset_sizes(base: str | None = None, base_config: str | None = None) -> list[PresetSize]:
    arch = architecture_for(base, base_config)
    rows = []
    for preset in list_presets():
        config = resolve_config(preset.name)
        modules, size = lora_size(config, arch)
        n = config.network
        rows.append(PresetSize(preset.name, preset.description, n.rank, n.alpha, n.targets,
                               n.train_text_encoder, modules, size, arch.label))
    return rows


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"Cannot read {path}: {exc}.", hint="The model folder may be incomplete.") from None


def _build(folder: Path, family: str, label: str) -> Architecture:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # torch.device("meta") is scoped to this thread; accelerate's init_empty_weights patches torch
    # globally and would break a model load running concurrently in the GUI's training thread.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_read(folder / "unet" / "config.json"))
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(**_read(folder / "text_encoder" / "config.json")))}
        if family == "sdxl":
            encoders["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**_read(folder / "text_encoder_2" / "config.json")))
    return Architecture(family, unet, encoders, label)


def family_architecture(family: str) -> Architecture:
    """The bundled layout of a family (SD 1.5, SD 2.x, SDXL) on the meta device."""
    return _build(BUNDLED_CONFIGS[family], family, FAMILY_LABELS[family])
