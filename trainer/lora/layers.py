"""A LoRA file's layers in memory, one class per adapter type, all with the kohya meaning of alpha.

``LoraModule`` is LoRA, LoCon (a k×k ``down``) and DoRA (with ``dora_scale``, the magnitude of each
output row, LyCORIS's ``wd_on_out`` shape [out, 1(, 1, 1)]); LoHa and LoKr live in
``trainer.lora.lycoris_keys``. Every class has ``name``, ``alpha``, ``rank``, ``kind``, ``out_in``,
``tensors()`` (the key suffixes it is written with), ``delta_weight()`` and ``factors()``, the
exact (down, up) pair Generate loads. ``LoraFile`` is a whole file normalised to kohya names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(eq=False)
class LoraModule:
    """One layer's LoRA: ``W = W0 + (alpha / rank) · up @ down`` (DoRA: then rescaled per output row)."""

    name: str  # kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    down: torch.Tensor  # A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # B: [out, r] or [out, r, 1, 1]
    alpha: float
    dora_scale: torch.Tensor | None = None  # DoRA's magnitude m: [out, 1] or [out, 1, 1, 1]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def kind(self) -> str:
        if self.dora_scale is not None:
            return "dora"
        return "locon" if self.is_conv and tuple(self.down.shape[2:]) != (1, 1) else "lora"

    @property
    def out_in(self) -> tuple[int, int]:
        """(out, in·kh·kw) of the layer."""
        return int(self.up.shape[0]), int(self.down[0].numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        parts = {"lora_down.weight": self.down, "lora_up.weight": self.up}
        if self.dora_scale is not None:
            parts["dora_scale"] = self.dora_scale
        return parts

    def delta_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in fp32, shaped like the base layer's weight. DoRA needs that weight ``base`` (W0):
        ΔW = m · (W0 + s·BA) / ‖W0 + s·BA‖_row − W0."""
        delta = self.scale * (self.up.float().flatten(1) @ self.down.float().flatten(1))
        delta = delta.reshape(self.up.shape[0], *self.down.shape[1:])
        if self.dora_scale is None:
            return delta
        if base is None:
            raise ValueError(f"{self.name} is DoRA: its update depends on the base weight")
        merged = base.float().reshape(delta.shape) + delta
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
        return merged * (self.dora_scale.float().reshape(norm.shape) / norm) - base.float().reshape(delta.shape)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) with up @ down = the low-rank update, the scale folded into up."""
        return self.down.float(), self.up.float() * self.scale


@dataclass(eq=False)
class LoraFile:
    """A LoRA file normalised to kohya names and kohya alpha, whatever style it was written in."""

    path: Path
    style: str  # "kohya" | "peft" | "diffusers-old"
    family: str | None  # "sd1" | "sd2" | "sdxl", None when the file does not tell
    modules: dict[str, LoraModule]  # or LohaModule / LokrModule (trainer.lora.lycoris_keys)
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: str = "fp16"  # most common weight dtype

    @property
    def network_type(self) -> str:
        """lora, locon, dora, loha, lokr, or "mixed (lora, loha)" for a file holding several."""
        kinds = {m.kind for m in self.modules.values()}
        if kinds == {"lora", "locon"}:
            return "locon"
        if "dora" in kinds and kinds <= {"dora", "lora", "locon"}:
            return "dora"
        return kinds.pop() if len(kinds) == 1 else f"mixed ({', '.join(sorted(kinds))})"
