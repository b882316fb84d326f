"""Where LoRA goes and how it is attached: target sets, peft injection, trainable parameters.

peft does the wrapping (``inject_adapter_in_model``): each targeted Linear/1x1-conv keeps its
frozen weight W0 and gains ``lora_A`` (r x in, Kaiming/Gaussian init) and ``lora_B`` (out x r,
zeros), with ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA). Because B starts at
zero, the wrapped model is exactly the base model until the first optimiser step.

Target modules are listed by their full paths rather than by suffix patterns, so the same list
drives injection, file-size estimates and export, and nothing is matched by accident.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from trainer.config.schema import NetworkConfig

ADAPTER_NAME = "lora_studio"  # distinct from any module path substring (see DESIGN §7)

# UNet transformer-block leaf modules of each target set (kohya's "full" is its default).
_UNET_TARGET_PATTERNS: dict[str, tuple[str, ...]] = {
    "cross-attn": (r"attn2\.(to_q|to_k|to_v|to_out\.0)",),
    "attn": (r"attn[12]\.(to_q|to_k|to_v|to_out\.0)",),
    "full": (
        r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
        r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
        r"attentions\.\d+\.(proj_in|proj_out)",
    ),
}
_TE_ATTN = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"
_TE_MLP = r"mlp\.(fc1|fc2)"


def _is_lora_able(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)


def _matching(model: torch.nn.Module, patterns: Iterable[str]) -> list[str]:
    compiled = [re.compile(rf"(^|\.){p}$") for p in patterns]
    return [
        name
        for name, module in model.named_modules()
        if _is_lora_able(module) and any(c.search(name) for c in compiled)
    ]


def unet_target_modules(unet: torch.nn.Module, targets: str) -> list[str]:
    """Full module paths of the UNet layers that a target set puts LoRA on."""
    if targets not in _UNET_TARGET_PATTERNS:
        raise ValueError(f"unknown target set {targets!r}")
    return _matching(unet, _UNET_TARGET_PATTERNS[targets])


def text_encoder_target_modules(text_encoder: torch.nn.Module, include_mlp: bool) -> list[str]:
    """Full module paths of a CLIP text encoder's attention (and optionally MLP) projections."""
    patterns = [_TE_ATTN] + ([_TE_MLP] if include_mlp else [])
    return _matching(text_encoder, patterns)


@dataclass(frozen=True)
class LoraPlan:
    """What will be trained: module paths per component ("unet", "text_encoder", ...)."""

    modules: dict[str, list[str]]

    def count(self) -> int:
        return sum(len(v) for v in self.modules.values())


def plan_lora(network: NetworkConfig, unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module]) -> LoraPlan:
    modules = {"unet": unet_target_modules(unet, network.targets)}
    if network.train_text_encoder:
        for name, encoder in text_encoders.items():
            modules[name] = text_encoder_target_modules(encoder, network.te_mlp)
    return LoraPlan(modules)


def inject_lora(model: torch.nn.Module, module_names: list[str], network: NetworkConfig) -> None:
    """Wrap ``module_names`` of ``model`` in place with trainable fp32 LoRA layers."""
    peft_config = PeftLoraConfig(
        r=network.rank,
        lora_alpha=network.alpha,
        target_modules=module_names,
        lora_dropout=network.lora_dropout,
        use_rslora=network.rslora,
        init_lora_weights=True if network.lora_init == "kaiming" else "gaussian",
        bias="none",
    )
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)
    for param in lora_parameters(model):
        param.data = param.data.float()
        param.requires_grad_(True)


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """Module path (as in the base model, no peft prefixes) -> wrapped layer."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params: list[torch.nn.Parameter] = []
    for layer in lora_layers(model).values():
        params.extend(layer.lora_A[ADAPTER_NAME].parameters())
        params.extend(layer.lora_B[ADAPTER_NAME].parameters())
    return params


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{path}.lora_A`` / ``{path}.lora_B`` weights (live tensors, not copies)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A[ADAPTER_NAME].weight
        state[f"{name}.lora_B"] = layer.lora_B[ADAPTER_NAME].weight
    return state


def load_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy weights saved by ``lora_state`` back into an injected model (same plan)."""
    live = lora_state(model)
    missing = sorted(set(live) - set(state))
    extra = sorted(set(state) - set(live))
    if missing or extra:
        raise KeyError(f"LoRA state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(state[key])


def scaling_of(layer: LoraLayer) -> float:
    return float(layer.scaling[ADAPTER_NAME])


def module_in_out(module: torch.nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or 1x1 Conv2d (wrapped or not)."""
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    if isinstance(base, torch.nn.Linear):
        return base.in_features, base.out_features
    return base.in_channels, base.out_channels
