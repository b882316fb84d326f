"""kohya's three LoRA dropouts on peft's LoRA layers, active in training mode only.

sd-scripts (``networks/lora.py``, ``LoRAModule.forward``) defines them on the r hidden values
``lx = lora_down(x)`` of each layer:

- module dropout ``module_dropout``: with probability p the whole layer's LoRA is skipped for this
  forward (the output is the frozen layer's alone; kept layers are *not* rescaled);
- neuron dropout ``network_dropout``: ``F.dropout(lx, p)`` (kept values scaled by 1/(1-p));
- rank dropout ``rank_dropout``: each of the r ranks is dropped per sample with probability p,
  the rest scaled by 1/(1-p).

peft computes ``lora_B(lora_A(dropout(x)))``, so a forward hook on ``lora_A`` that replaces its
output is exactly kohya's place (peft's own ``lora_dropout`` acts on x, before lora_A). The masks
come from torch's default generator of the activation's device: seeded with the run, saved in
checkpoints, and replayed by gradient checkpointing's recomputation. In eval mode (samples,
generation) the hook returns the output untouched, and export reads the weights only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.config.schema import NetworkConfig
from trainer.lora.inject import ADAPTER_NAME, lora_layers


@dataclass(frozen=True)
class KohyaDropout:
    """The forward hook of one ``lora_A`` (a Linear, or a Conv2d whose ranks are channels)."""

    neuron: float = 0.0
    rank: float = 0.0
    module: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.neuron or self.rank or self.module)

    def __call__(self, down: torch.nn.Module, inputs: tuple, lx: torch.Tensor) -> torch.Tensor | None:
        if not down.training:
            return None  # keep the output as it is
        if self.module:
            # A 0/1 factor instead of kohya's early return: same result (lora_B has no bias, so B·0 = 0),
            # no host-device sync on a GPU, and DDP still sees every LoRA parameter used (zero gradients).
            keep = torch.rand((), device=lx.device) >= self.module
            lx = lx * keep.to(lx.dtype)
        if self.neuron:
            lx = F.dropout(lx, p=self.neuron, training=True)
        if self.rank:
            ranks_dim = 1 if isinstance(down, torch.nn.Conv2d) else lx.ndim - 1
            mask = torch.rand((lx.shape[0], lx.shape[ranks_dim]), device=lx.device) > self.rank
            shape = [lx.shape[0]] + [1] * (lx.ndim - 1)
            shape[ranks_dim] = lx.shape[ranks_dim]
            lx = lx * (mask.view(shape).to(lx.dtype) / (1.0 - self.rank))
        return lx


def dropout_of(network: NetworkConfig) -> KohyaDropout:
    return KohyaDropout(neuron=network.network_dropout, rank=network.rank_dropout, module=network.module_dropout)


def attach_kohya_dropout(model: torch.nn.Module, network: NetworkConfig) -> int:
    """Hook the dropouts ``network`` asks for into every LoRA layer of ``model``; returns how many
    layers got them (0 when all three are off). Layers without a ``lora_A`` (LoHa, LoKr) are skipped."""
    hook = dropout_of(network)
    if not hook.active:
        return 0
    hooked = 0
    for layer in lora_layers(model).values():
        down = getattr(layer, "lora_A", {})
        if ADAPTER_NAME in down:
            down[ADAPTER_NAME].register_forward_hook(hook)
            hooked += 1
    return hooked
