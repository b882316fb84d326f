"""Optimisers and learning-rate schedules for the LoRA parameters.

Optional optimisers (8-bit AdamW from bitsandbytes, Prodigy) fall back to plain AdamW with a
notice when their package is missing or cannot run on this device, so a preset never fails
on a machine without them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from diffusers.optimization import get_scheduler

from trainer.config.schema import StudioConfig
from trainer.lora.adapters import BLOCK_COUNT, BlockPlan
from trainer.lora.inject import lora_parameters

_ADAPTER_CONTAINER = re.compile(r"\.(?:lora_A|lora_B|lora_magnitude_vector|hada_\w+|lokr_\w+)\.")


def lora_param_groups(components: dict[str, torch.nn.Module], config: StudioConfig) -> list[dict]:
    """The optimiser's parameter groups: the LoRA parameters of each component ("unet",
    "text_encoder", ...) grouped by learning rate, in a fixed order (the UNet's base lr first).

    Each parameter's lr is its component's (``optim.lr`` or the text encoder's) times
    ``lr_multiplier``; parameters with the same lr share a group.
    """
    groups: dict[tuple[str, float], list[torch.nn.Parameter]] = {}
    for component, model in components.items():
        base_lr = config.optim.lr if component == "unet" else config.effective_te_lr
        names = {id(param): name for name, param in model.named_parameters()}
        for param in lora_parameters(model):
            lr = base_lr * lr_multiplier(component, names[id(param)], config)
            groups.setdefault((component, lr), []).append(param)
    return [{"params": params, "lr": lr} for (_, lr), params in groups.items()]


def lr_multiplier(component: str, name: str, config: StudioConfig) -> float:
    """The factor on the component's learning rate of one LoRA parameter (``name`` as peft has it,
    e.g. ``...attn2.to_k.lora_B.lora_studio.weight``)."""
    factor = 1.0
    if config.optim.loraplus_ratio and is_up_matrix(name):
        # LoRA+ (Hayou et al. 2024): B learns ratio times faster than A. kohya tests "lora_up" in the
        # name, so LyCORIS-style weights (LoHa, LoKr) keep the base lr there too.
        factor *= config.optim.loraplus_ratio
    # Per-block learning rates (kohya's block lr weights) multiply in: LoRA+ and block lr compose.
    if config.network.block_lr and component == "unet":
        factor *= block_lr_factor(name, config)
    return factor


def block_lr_factor(name: str, config: StudioConfig) -> float:
    """The ``block_lr`` factor of a UNet adapter parameter (1 outside kohya's blocks)."""
    path = _ADAPTER_CONTAINER.split(name, maxsplit=1)[0]
    family = "sdxl" if len(config.network.block_lr.split(",")) == BLOCK_COUNT["sdxl"] else "sd1"
    return BlockPlan.of(config.network, family).lr_factor("unet", path)


def is_up_matrix(name: str) -> bool:
    """B of a LoRA layer (kohya's ``lora_up``)."""
    return ".lora_B." in name


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
            import bitsandbytes as bnb

            if device.type != "cuda":
                raise RuntimeError("8-bit optimiser states need a CUDA GPU")
            return bnb.optim.AdamW8bit(param_groups, lr=o.lr, weight_decay=o.weight_decay)
        except (ImportError, RuntimeError) as exc:
            notify(f"8-bit AdamW is not available ({exc}); using standard AdamW instead "
                   "(install 'lora-studio[bnb]' on a CUDA machine for 8-bit states).")
            name = "adamw"
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy

            # Prodigy finds its own step size: the configured lr acts as a multiplier (1.0 typical).
            return Prodigy(param_groups, lr=o.lr, weight_decay=o.weight_decay)
        except ImportError:
            notify("Prodigy is not installed; using AdamW ('pip install lora-studio[prodigy]' to enable it).")
            name = "adamw"
    if name == "adafactor":
        from transformers.optimization import Adafactor

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
    # num_cycles only reaches cosine_with_restarts (diffusers ignores it for the others)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1),
                         num_cycles=config.optim.lr_cycles)


def schedule_notice(config: StudioConfig) -> str:
    """A warning for a schedule that will not do what its name says ('' when it will)."""
    if config.optim.scheduler == "cosine_with_restarts" and config.optim.lr_cycles == 1:
        return ("cosine_with_restarts with lr_cycles = 1 never restarts (it is a plain cosine decay); "
                "set lr_cycles (--lr-cycles 3 for three cycles).")
    return ""
