"""How A1111 (extensions-builtin/Lora, 1.10) and ComfyUI (comfy/weight_adapter) turn one layer of a
kohya/LyCORIS file into ΔW, re-implemented from their loaders' logic for the tests.

Only what decides the result is kept: which keys a layer type needs, the rank the loader divides
alpha by, the reshape to the base weight, and DoRA's normalisation axis. ``None`` = the loader
would not apply this layer (or, for A1111's DoRA, would apply a different formula).
"""

from __future__ import annotations

import torch


def _scale(tensors: dict, stem: str, dim: int | None) -> float:
    alpha = tensors.get(f"{stem}.alpha")
    return float(alpha.item()) / dim if alpha is not None and dim else 1.0


def _lokr(tensors: dict, stem: str, base: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    get = lambda k: tensors.get(f"{stem}.{k}")
    dim = None
    w1 = get("lokr_w1")
    if w1 is None:
        w1, dim = get("lokr_w1_a") @ get("lokr_w1_b"), get("lokr_w1_b").shape[0]
    w2 = get("lokr_w2")
    if w2 is None:
        w2, dim = get("lokr_w2_a") @ get("lokr_w2_b"), get("lokr_w2_b").shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1.float(), w2.float()).reshape(base.shape), dim


def _updown(tensors: dict, stem: str, base: torch.Tensor) -> tuple[torch.Tensor, int | None] | None:
    get = lambda k: tensors.get(f"{stem}.{k}")
    if get("lora_up.weight") is not None:
        up, down = get("lora_up.weight").float(), get("lora_down.weight").float()
        return (up.flatten(1) @ down.flatten(1)).reshape(base.shape), down.shape[0]
    if get("hada_w1_a") is not None:
        w1 = get("hada_w1_a").float() @ get("hada_w1_b").float()
        w2 = get("hada_w2_a").float() @ get("hada_w2_b").float()
        return (w1 * w2).reshape(base.shape), get("hada_w1_b").shape[0]
    if get("lokr_w1") is not None or get("lokr_w1_a") is not None:
        return _lokr(tensors, stem, base)
    return None


def a1111_delta(tensors: dict, stem: str, base: torch.Tensor) -> torch.Tensor | None:
    """network.py finalize_updown: DoRA decomposes the *unscaled* update over the input axis, then
    scales by alpha/dim. A wd_on_out dora_scale ([out, 1]) does not fit that formula: None."""
    found = _updown(tensors, stem, base.float())
    if found is None:
        return None
    updown, dim = found
    dora = tensors.get(f"{stem}.dora_scale")
    if dora is not None:
        if dora.shape[0] == base.shape[0] and base.shape[0] != 1:
            return None
        merged = updown + base.float()
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
        updown = merged * (dora.float() / norm) - base.float()
    return updown * _scale(tensors, stem, dim)


def comfy_delta(tensors: dict, stem: str, base: torch.Tensor) -> torch.Tensor | None:
    """weight_adapter: ΔW = (alpha/dim)·updown; DoRA (weight_decompose) picks the axis by the
    dora_scale's first dimension and, on the output axis, divides by the norm of W0's rows."""
    found = _updown(tensors, stem, base.float())
    if found is None:
        return None
    updown, dim = found
    diff = updown * _scale(tensors, stem, dim)
    dora = tensors.get(f"{stem}.dora_scale")
    if dora is None:
        return diff
    weight = base.float()
    calc = weight + diff
    if dora.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    norm = norm + torch.finfo(torch.float32).eps
    return calc * (dora.float() / norm) - weight
