"""What a user asks the generator for: LoRA specs, block weights, txt2img requests, and what comes back.

Plain frozen values, checked once when built (``ConfigError`` naming the field), so the CLI's
``--lora FILE:W:TE:UNET``, the Generate tab's slots and scripts all make the same objects.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.core.errors import ConfigError
from trainer.core.output_paths import check_output_folder
from trainer.generate.infotext import (
    Infotext,
    save_png,
)
from trainer.generate.schedulers import DEFAULT_SAMPLER, parse_sampler

# A1111 "LoRA Block Weight" presets (17 values: BASE, IN01-IN08 with attention, MID, OUT03-OUT11).
LBW_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5,) * 17,
}


@dataclass(frozen=True)
class BlockWeights:
    """Per-block multipliers of one LoRA (A1111 LoRA Block Weight style).

    Either ``down``/``mid``/``up`` (every UNet layer in that half) or ``vector`` in LBW order:
    BASE (the text encoder), one value per down-block transformer, MID, one per up-block
    transformer (17 values for SD1/SD2, 12 for SDXL). Resnet layers of a LoCon follow the
    transformer of the same block and index; layers outside the blocks keep 1.
    """

    down: float = 1.0
    mid: float = 1.0
    up: float = 1.0
    vector: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.down, self.mid, self.up, *self.vector)):
            raise ConfigError("Block weights must be finite numbers.")

    @property
    def is_identity(self) -> bool:
        return (self.down, self.mid, self.up) == (1.0, 1.0, 1.0) and all(v == 1.0 for v in self.vector)

    @property
    def te(self) -> float:
        """LBW's BASE value (multiplies the text-encoder weight)."""
        return self.vector[0] if self.vector else 1.0


def parse_block_weights(text: str) -> BlockWeights:
    """"down=0.5,mid=1,up=0", an LBW vector "1,0,0,...", or an LBW preset name ("OUTALL")."""
    text = text.strip()
    if text.upper() in LBW_PRESETS:
        return BlockWeights(vector=tuple(float(v) for v in LBW_PRESETS[text.upper()]))
    hint = (f"Write down=W,mid=W,up=W, a comma-separated LBW vector, or a preset: {', '.join(LBW_PRESETS)}.")
    try:
        if "=" in text:
            values = {}
            for item in text.split(","):
                key, _, value = item.partition("=")
                key = key.strip().lower()
                if key not in ("down", "mid", "up"):
                    raise ConfigError(f"Unknown block {key!r} in block weights {text!r}.", hint=hint)
                values[key] = float(value)
            return BlockWeights(**values)
        return BlockWeights(vector=tuple(float(v) for v in text.split(",")))
    except ValueError:
        raise ConfigError(f"Cannot read the block weights {text!r}.", hint=hint) from None


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file in a generation and how strongly it applies."""

    path: str | Path
    weight: float = 1.0
    te_weight: float | None = None  # text encoder; None = weight (A1111's te=)
    unet_weight: float | None = None  # UNet; None = weight (A1111's unet=)
    blocks: BlockWeights = field(default_factory=BlockWeights)
    enabled: bool = True

    def __post_init__(self) -> None:
        for label, value in (("weight", self.weight), ("te_weight", self.te_weight), ("unet_weight", self.unet_weight)):
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"LoRA {label} of {Path(self.path).name} must be a finite number, not {value}.")

    @property
    def name(self) -> str:
        """The name A1111 knows the file by (its stem), as in ``<lora:name:0.8>``."""
        return Path(self.path).stem

    @property
    def te(self) -> float:
        return self.weight if self.te_weight is None else self.te_weight

    @property
    def unet(self) -> float:
        return self.weight if self.unet_weight is None else self.unet_weight


def parse_lora_arg(text: str) -> LoraSpec:
    """The CLI's ``--lora FILE[:WEIGHT[:TE:UNET]]`` (a Windows drive letter's colon is kept)."""
    head, parts = text, []
    while True:
        stem, sep, tail = head.rpartition(":")
        if not sep or not _is_number(tail) or len(parts) == 3:
            break
        head, parts = stem, [tail, *parts]
    stem, _, tail = head.rpartition(":")
    if stem and not Path(head).expanduser().exists() and (
            stem.lower().endswith(".safetensors") or Path(stem).expanduser().is_file()):
        if _is_number(tail):  # FILE:1:2:3:4
            raise ConfigError(f"--lora {text}: too many numbers.", hint="Give FILE:WEIGHT or FILE:WEIGHT:TE:UNET.")
        raise ConfigError(f"--lora {text}: the weight '{tail}' is not a number.",
                          hint=f"Give FILE:WEIGHT, e.g. {stem}:0.8.")
    values = [float(p) for p in parts]
    if len(values) == 2:
        raise ConfigError(f"--lora {text}: give FILE:WEIGHT or FILE:WEIGHT:TE:UNET.")
    return LoraSpec(head, values[0] if values else 1.0,
                    values[1] if len(values) == 3 else None, values[2] if len(values) == 3 else None)


@dataclass(frozen=True)
class GenerationRequest:
    """One txt2img job: ``batch_count`` images with seeds seed, seed+1, ... (A1111's batch count)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = -1  # -1 = random
    steps: int = 25
    cfg_scale: float = 7.0
    width: int = 0  # 0 = the model's native size
    height: int = 0
    scheduler: str = DEFAULT_SAMPLER
    batch_count: int = 1
    loras: tuple[LoraSpec, ...] = ()
    compare_without_loras: bool = False  # also render each seed with every LoRA off
    clip_skip: int = 1  # 2 = A1111 "clip skip 2"

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", tuple(self.loras))
        checks = [
            (self.steps >= 1, "steps", "at least 1"),
            (self.batch_count >= 1, "batch count (-n)", "at least 1"),
            (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0, "cfg", "a number >= 0"),
            (self.width >= 0 and self.height >= 0, "width/height", "positive (or 0 for the model's size)"),
            (-1 <= self.seed < 2 ** 63, "seed", "-1 (random) or a number from 0 to 2^63-1"),
            (self.clip_skip >= 1, "clip skip", "at least 1"),
        ]
        for ok, label, need in checks:
            if not ok:
                raise ConfigError(f"The {label} must be {need}.")
        parse_sampler(self.scheduler)  # unknown names fail here, before any model work
        paths = [_path_key(spec.path) for spec in self.loras]
        if len(set(paths)) != len(paths):
            raise ConfigError("The same LoRA file is listed twice.", hint="Give each file once with the sum of its weights.")


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image
    seed: int
    infotext: Infotext
    loras_on: bool = True  # False for the "LoRA off" image of a comparison


@dataclass(frozen=True)
class GenerationProgress:
    image: int  # 0-based index of the image being rendered
    images: int
    step: int  # steps done for this image
    steps: int


def _path_key(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
def save_images(images: Sequence[GeneratedImage], folder: str | Path) -> list[Path]:
    """Save as A1111 names them (``00012-7.png``: running number, seed), each with its infotext."""
    folder = check_output_folder(folder, label="The image folder")
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"^(\d{5,})-", p.name))]
    number = max(numbers, default=-1) + 1
    paths = []
    for item in images:
        suffix = "" if item.loras_on else "-nolora"
        paths.append(save_png(item.image, folder / f"{number:05d}-{item.seed}{suffix}.png", item.infotext))
        number += 1
    return paths
