"""What one training step touches, counted on the meta device: FLOPs, activations, LoRA inputs.

The real diffusers/transformers modules are built from a model's configs on PyTorch's ``meta``
device and run once at the run's resolution (tensors with shapes, no storage: about a second, no
weights in memory). Hooks count per component what ``trainer.train.estimate`` turns into memory
and time; see that module for the method and its calibration.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.models.family import BUNDLED_CONFIGS

BUNDLED = {**BUNDLED_CONFIGS, "sd15": BUNDLED_CONFIGS["sd1"]}  # architecture name -> shipped config folder


TEXT_TOKENS = 77


@dataclass(frozen=True)
class ModelArch:
    """A model's architecture as its configs describe it; no weights."""

    family: str
    unet_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]
    text_encoder_configs: tuple[Mapping[str, Any], ...]

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelArch:
        """From a diffusers folder or config folder (``unet/config.json`` etc.)."""
        folder = Path(folder)

        def read(sub: str) -> dict[str, Any]:
            return json.loads((folder / sub / "config.json").read_text(encoding="utf-8"))

        encoders = [read(sub) for sub in ("text_encoder", "text_encoder_2") if (folder / sub / "config.json").is_file()]
        unet = read("unet")
        family = "sdxl" if len(encoders) > 1 or unet.get("addition_embed_type") == "text_time" else (
            "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1")
        return cls(family, unet, read("vae"), tuple(encoders))

    @classmethod
    def bundled(cls, name: str) -> ModelArch:
        """``sd15`` / ``sd1``, ``sd2`` or ``sdxl`` from the configs shipped in ``trainer/models/configs``."""
        if name not in BUNDLED:
            raise ValueError(f"unknown architecture {name!r}; use one of {sorted(BUNDLED)}")
        return cls.from_folder(BUNDLED[name])


def model_arch(model_or_arch: Any) -> ModelArch:
    """A ``ModelArch`` from an arch, a loaded ``BaseModel``, a bundled name or a config folder."""
    if isinstance(model_or_arch, ModelArch):
        return model_or_arch
    if isinstance(model_or_arch, str) and model_or_arch in BUNDLED:
        return ModelArch.bundled(model_or_arch)
    if isinstance(model_or_arch, (str, Path)) and Path(model_or_arch).is_dir():
        return ModelArch.from_folder(model_or_arch)
    unet = getattr(model_or_arch, "unet", None)
    if unet is not None:
        encoders = [te for te in (getattr(model_or_arch, "text_encoder", None),
                                  getattr(model_or_arch, "text_encoder_2", None)) if te is not None]
        unet = getattr(unet, "module", unet)  # accelerate/DDP wrappers
        return ModelArch(getattr(model_or_arch, "family", "sd1"), dict(unet.config),
                         dict(model_or_arch.vae.config), tuple(te.config.to_dict() for te in encoders))
    raise ValueError(f"cannot tell the architecture of {model_or_arch!r}: pass a BaseModel, a ModelArch, "
                     f"a bundled name ({', '.join(sorted(BUNDLED))}) or a diffusers folder")


@dataclass(frozen=True)
class ComponentProfile:
    """One component's forward at a given input size, counted on the meta device."""

    params: int
    flops: float  # Linear + Conv2d + attention FLOPs of one forward
    attention_flops: float
    conv_flops: float  # the spatial (k > 1) convolutions' share of ``flops``: dense, the fastest kind
    activation_elements: int  # sum of leaf-module output elements
    module_calls: int
    lora_params_per_rank: int = 0
    lora_flops_per_rank: float = 0.0  # forward FLOPs of the LoRA branches at rank 1
    lora_input_elements_shared: int = 0  # distinct LoRA-layer inputs (fp32: one saved tensor each)
    lora_input_elements_per_layer: int = 0  # per-layer sum (autocast: each layer saves its own cast)
    lora_tokens: int = 0  # rows through LoRA layers: x·Aᵀ (tokens × rank) is kept for B's gradient
    lora_layers: int = 0


@dataclass(frozen=True)
class StepProfile:
    """Counts for batch 1 (everything but parameter counts scales linearly with the batch)."""

    unet: ComponentProfile
    text_encoders: tuple[ComponentProfile, ...]
    vae_encoder: ComponentProfile
    vae_params: int


def profile_step(arch: ModelArch, width: int, height: int, targets: str, train_text_encoder: bool,
                 te_mlp: bool) -> StepProfile:
    """Count FLOPs, activations and LoRA sizes of a batch-1 training step by a forward on ``meta``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.lora.inject import text_encoder_target_modules, unet_target_modules

    batch = 1
    scale = 2 ** (len(arch.vae_config["block_out_channels"]) - 1)
    lh, lw = height // scale, width // scale
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(arch.unet_config))
        vae = AutoencoderKL.from_config(dict(arch.vae_config))
        encoders = []
        for i, cfg in enumerate(arch.text_encoder_configs):
            cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})))

    unet_targets = unet_target_modules(unet, targets)
    cross_dim = int(arch.unet_config.get("cross_attention_dim") or 768)
    kwargs: dict[str, Any] = {}
    if arch.unet_config.get("addition_embed_type") == "text_time":
        time_dim = int(arch.unet_config["addition_time_embed_dim"])
        pooled = int(arch.unet_config["projection_class_embeddings_input_dim"]) - 6 * time_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled, device="meta"),
                                       "time_ids": torch.empty(batch, 6, device="meta")}
    unet_profile = _count(unet, unet_targets, lambda m: m(
        torch.empty(batch, int(arch.unet_config.get("in_channels", 4)), lh, lw, device="meta"),
        torch.zeros(batch, dtype=torch.long, device="meta"),
        torch.empty(batch, TEXT_TOKENS, cross_dim, device="meta"), **kwargs))
    te_profiles = []
    for encoder in encoders:
        te_targets = text_encoder_target_modules(encoder, te_mlp) if train_text_encoder else []
        te_profiles.append(_count(encoder, te_targets, lambda m: m(
            torch.zeros(batch, TEXT_TOKENS, dtype=torch.long, device="meta"))))
    vae_profile = _count(vae.encoder, [], lambda m: m(
        torch.empty(1, int(arch.vae_config.get("in_channels", 3)), height, width, device="meta")))
    return StepProfile(unet_profile, tuple(te_profiles), vae_profile, _numel(vae))


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _count(model: torch.nn.Module, lora_targets: list[str], run) -> ComponentProfile:
    flops = attention_flops = conv_flops = 0.0
    activation = calls = 0
    target_set = set(lora_targets)
    lora_params = lora_tokens = per_layer = 0
    lora_flops = 0.0
    shared: dict[int, int] = {}
    keep_alive: list[torch.Tensor] = []  # ids stay unique while the inputs are referenced

    def leaf_hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        nonlocal flops, conv_flops, activation, calls
        calls += 1
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor):
            activation += out.numel()
            if isinstance(module, torch.nn.Linear):
                flops += 2.0 * out.numel() * module.in_features
            elif isinstance(module, torch.nn.Conv2d):
                kh, kw = module.kernel_size
                conv = 2.0 * out.numel() * module.in_channels // module.groups * kh * kw
                flops += conv
                if kh * kw > 1:
                    conv_flops += conv

    def lora_hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        nonlocal lora_params, lora_flops, lora_tokens, per_layer
        x = args[0]
        keep_alive.append(x)
        features_in = module.in_features if isinstance(module, torch.nn.Linear) else module.in_channels
        features_out = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
        tokens = x.numel() // features_in
        lora_params += features_in + features_out
        lora_flops += 2.0 * tokens * (features_in + features_out)
        lora_tokens += tokens
        shared[id(x)] = x.numel()
        per_layer += x.numel()

    def attention_hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        nonlocal attention_flops
        hidden = args[0] if args else kwargs.get("hidden_states")
        context = kwargs.get("encoder_hidden_states")
        if context is None and len(args) > 1:
            context = args[1]
        if hidden is None:
            return
        queries = hidden.shape[-2] if hidden.dim() == 3 else hidden.shape[-1] * hidden.shape[-2]
        keys = context.shape[-2] if context is not None else queries
        attention_flops += 4.0 * hidden.shape[0] * queries * keys * module.inner_dim

    handles = []
    for name, module in model.named_modules():
        if not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(leaf_hook))
        if name in target_set:
            handles.append(module.register_forward_hook(lora_hook))
        if type(module).__name__ == "Attention" and hasattr(module, "inner_dim"):
            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    return ComponentProfile(
        params=_numel(model), flops=flops + attention_flops, attention_flops=attention_flops, conv_flops=conv_flops,
        activation_elements=activation, module_calls=calls, lora_params_per_rank=lora_params,
        lora_flops_per_rank=lora_flops, lora_input_elements_shared=sum(shared.values()),
        lora_input_elements_per_layer=per_layer, lora_tokens=lora_tokens, lora_layers=len(keep_alive),
    )
