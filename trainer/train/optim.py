"""Optimisers and learning-rate schedules for the LoRA parameters.

Optional optimisers (8-bit AdamW from bitsandbytes, Prodigy) fall back to plain AdamW with a
notice when their package is missing or cannot run on this device, so a preset never fails
on a machine without them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.optimization import get_scheduler

from trainer.config.schema import StudioConfig


def build_optimizer(
    config: StudioConfig,
    param_groups: list[dict],
    device: torch.device,
    notify: Callable[[str], None],
) -> torch.optim.Optimizer:
    """The optimiser named by ``config.optim.optimizer`` over ``param_groups`` (each with its lr)."""
    o = config.optim
    name = o.optimizer
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415 - optional dependency

            if device.type != "cuda":
                raise RuntimeError("8-bit optimiser states need a CUDA GPU")
            return bnb.optim.AdamW8bit(param_groups, lr=o.lr, weight_decay=o.weight_decay)
        except (ImportError, RuntimeError) as exc:
            notify(f"8-bit AdamW is not available ({exc}); using standard AdamW instead "
                   "(install 'lora-studio[bnb]' on a CUDA machine for 8-bit states).")
            name = "adamw"
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy  # noqa: PLC0415 - optional dependency

            # Prodigy finds its own step size: the configured lr acts as a multiplier (1.0 typical).
            return Prodigy(param_groups, lr=o.lr, weight_decay=o.weight_decay)
        except ImportError:
            notify("Prodigy is not installed; using AdamW ('pip install lora-studio[prodigy]' to enable it).")
            name = "adamw"
    if name == "adafactor":
        from transformers.optimization import Adafactor  # noqa: PLC0415

        return Adafactor(param_groups, lr=o.lr, weight_decay=o.weight_decay,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    return adamw(param_groups, lr=o.lr, weight_decay=o.weight_decay)


def adamw(param_groups: list[dict], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has a fused kernel for the device (CUDA, and CPU since torch 2.4).

    Fused AdamW updates every LoRA tensor in one kernel instead of a dozen small ops per tensor:
    on a CPU the per-tensor loop costs more than a rank-32 LoRA's whole backward (see
    bench/train_step.py). The result is the same update up to float rounding.
    """
    try:
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device (or dtype) without a fused kernel, e.g. MPS on older torch
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)


def build_lr_scheduler(config: StudioConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """A LambdaLR whose state_dict is plain data (safe to checkpoint without pickle)."""
    name = config.optim.scheduler
    warmup = config.optim.warmup_steps
    if name == "constant" and warmup:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))
