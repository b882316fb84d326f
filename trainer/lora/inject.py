"""Where LoRA goes and how it is attached: target sets, peft injection, trainable parameters.

peft does the wrapping (``inject_adapter_in_model``): each targeted Linear/1x1-conv keeps its
frozen weight W0 and gains ``lora_A`` (r x in, Kaiming/Gaussian init) and ``lora_B`` (out x r,
zeros), with ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA). Because B starts at
zero, the wrapped model is exactly the base model until the first optimiser step.

The other adapter types (``trainer.lora.adapters``: DoRA, LoCon's 3x3 convs, LoHa, LoKr) are peft
tuners too, and per-module ranks (kohya's block_dims, LoCon's conv rank) are peft's rank/alpha
patterns; ``lora_parameters``/``lora_state`` cover every type's trainable tensors.

Target modules are listed by their full paths rather than by suffix patterns, so the same list
drives injection, file-size estimates and export, and nothing is matched by accident.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

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
    """What will be trained: module paths per component ("unet", "text_encoder", ...), and each
    module's (rank, alpha) where per-block dims, LoCon's conv rank or block lr make them differ."""

    modules: dict[str, list[str]]
    ranks: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)

    def count(self) -> int:
        return sum(len(v) for v in self.modules.values())

    def rank_alpha(self, component: str, path: str, network: NetworkConfig) -> tuple[int, float]:
        return self.ranks.get(component, {}).get(path, (network.rank, network.alpha))


def plan_lora(network: NetworkConfig, unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module]) -> LoraPlan:
    from trainer.lora.adapters import BlockPlan, is_conv3x3, locon_conv_targets

    family = "sdxl" if "text_encoder_2" in text_encoders else "sd1"  # SD2 numbers its blocks as SD1
    blocks = BlockPlan.of(network, family)
    unet_paths = unet_target_modules(unet, network.targets)
    if network.network == "locon":
        unet_paths += [p for p in locon_conv_targets(unet) if p not in unet_paths]
    named = dict(unet.named_modules())
    modules: dict[str, list[str]] = {"unet": []}
    ranks: dict[str, dict[str, tuple[int, float]]] = {"unet": {}}
    for path in unet_paths:
        rank, alpha = blocks.rank_alpha(network, "unet", path, is_conv3x3(named[path]))
        if rank > 0:
            modules["unet"].append(path)
            ranks["unet"][path] = (rank, alpha)
    if network.train_text_encoder:
        for name, encoder in text_encoders.items():
            modules[name] = text_encoder_target_modules(encoder, network.te_mlp)
            ranks[name] = {p: (network.rank, network.alpha) for p in modules[name]}
    return LoraPlan(modules, ranks)


def inject_lora(model: torch.nn.Module, module_names: list[str], network: NetworkConfig,
                ranks: dict[str, tuple[int, float]] | None = None) -> None:
    """Wrap ``module_names`` of ``model`` in place with trainable fp32 adapters of ``network.network``'s type."""
    from trainer.lora.adapters import peft_config

    ranks = ranks or {}
    per_module = {p: ranks.get(p, (network.rank, network.alpha)) for p in module_names}
    inject_adapter_in_model(peft_config(network, per_module), model, adapter_name=ADAPTER_NAME)
    for param in lora_parameters(model):
        param.data = param.data.float()
        param.requires_grad_(True)


def lora_layers(model: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    """Module path (as in the base model, no peft prefixes) -> wrapped layer (LoRA, DoRA, LoHa, LoKr)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def adapter_parameters(layer: BaseTunerLayer, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.nn.Parameter]:
    """``container`` -> parameter of one adapter in one layer: lora_A, lora_B (lora_magnitude_vector
    for DoRA), hada_w1_a ..., lokr_w1 ...; the frozen base layer's own weights are never among them."""
    params = {}
    for name, param in layer.named_parameters():
        parts = name.split(".")
        if parts[0] == "base_layer" or adapter_name not in parts:
            continue
        params[parts[0]] = param
    return params


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params: list[torch.nn.Parameter] = []
    for layer in lora_layers(model).values():
        params.extend(adapter_parameters(layer).values())
    return params


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{path}.lora_A`` / ``{path}.lora_B`` (``{path}.hada_w1_a`` ... for other types) weights (live tensors)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        for container, param in adapter_parameters(layer).items():
            state[f"{name}.{container}"] = param
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
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if isinstance(base, torch.nn.Linear):
        return base.in_features, base.out_features
    return base.in_channels, base.out_channels
