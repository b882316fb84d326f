"""Unfused LoRA inference at the cost of one low-rank product per layer, however many files are on.

peft's unfused forward adds ``B(A(x)) * scaling`` per active adapter: two small matmuls, then two
full passes over the layer's output (multiply by the scale, add) and a few module calls, for
every adapter. With two LoRAs (ranks 32 + 16) on SD 1.5 at 128 px on a 2-core CPU that made a
denoising step 1.10-1.17x the base step, although the LoRA matmuls add only 5.4% to the step's
FLOPs. Packing the enabled adapters of a layer side by side,

    down = cat(A_1, ..., A_n)                    [r_1 + ... + r_n, in]
    up   = cat(s_1*B_1, ..., s_n*B_n)            [out, r_1 + ... + r_n]

gives ``up @ down = sum_i s_i * B_i @ A_i`` exactly (a block matrix product), where s_i is the
scale peft holds for that layer (the user's weight x TE/UNet split x block weight; the file's
alpha/r is already folded into B_i at load time). The product is added to the base output by one
fused multiply-add (``addmm_``/``baddbmm_``): two ops per layer, no pass over the output of its
own, and the step costs 1.01-1.05x the base step (``python -m bench.generate_step``).

A packed layer keeps its peft adapters (they still fuse, re-weight and unload as before) but has
them switched off while a forward hook adds the packed product; a layer whose adapters all have
scale 0 is switched off with no hook. Why a hook: it is public torch API, whereas peft's only way
into its forward is the ``LoraVariant`` API, which peft documents as private and prone to change
(and a packed peft adapter without one would still pay the two passes over the output).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch.utils.hooks import RemovableHandle


class PackedLayer:
    """Forward hook of one LoRA-wrapped Linear/Conv2d: output += up @ down @ x."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, conv: torch.nn.Conv2d | None) -> None:
        self.down = down  # [R, in] (Linear) or [R, in, kh, kw] (Conv2d)
        self.up = up  # [out, R]
        # A conv's down-projection runs with its lora_A conv's geometry (peft copies the base's).
        self.conv = None if conv is None else (conv.stride, conv.padding, conv.dilation)
        self.pointwise = self.conv == ((1, 1), (0, 0), (1, 1)) and down.shape[2:] == (1, 1)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else kwargs["x"]
        if x.dtype != self.down.dtype:
            x = x.to(self.down.dtype)  # as peft casts its input to the adapter's dtype
        # In place only when nothing can be watching the base output: a fresh tensor from the base
        # layer, contiguous, and not part of an autograd graph.
        in_place = output.is_contiguous() and not output.requires_grad and output.dtype == self.up.dtype
        if self.conv is None:
            hidden = F.linear(x, self.down)
            if in_place:
                output.view(-1, output.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), self.up.t())
                return output
            return output + F.linear(hidden, self.up).to(output.dtype)
        if self.pointwise:  # a 1x1 conv (SD1 proj_in/out) as a batched matmul: mkldnn is slow at this rank
            hidden = torch.matmul(self.down.flatten(1), x.flatten(2))
        else:
            stride, padding, dilation = self.conv
            hidden = F.conv2d(x, self.down, None, stride, padding, dilation)
        batch, rank = hidden.shape[:2]
        if in_place:
            output.view(batch, output.shape[1], -1).baddbmm_(self.up.expand(batch, -1, -1),
                                                              hidden.reshape(batch, rank, -1))
            return output
        return output + torch.matmul(self.up, hidden.reshape(batch, rank, -1)).view(output.shape).to(output.dtype)


@dataclass
class PackedAdapters:
    """The packed layers of one set of adapters at one set of weights (``key``), attachable and detachable."""

    key: Hashable
    layers: dict[str, tuple[LoraLayer, PackedLayer | None]]  # "component.path" -> layer, hook (None: all scales 0)
    attached: bool = False
    _handles: list[RemovableHandle] = field(default_factory=list)
    _was_disabled: dict[str, bool] = field(default_factory=dict)

    def attach(self) -> None:
        """Switch each packed layer's peft adapters off and let its hook add the packed product."""
        if self.attached:
            return
        for name, (layer, packed) in self.layers.items():
            self._was_disabled[name] = layer.disable_adapters
            layer.enable_adapters(False)
            if packed is not None:
                self._handles.append(layer.register_forward_hook(packed, with_kwargs=True))
        self.attached = True

    def detach(self) -> None:
        """Remove the hooks and give each layer back the peft state it had before ``attach``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, (layer, _) in self.layers.items():
            if name in self._was_disabled:
                layer.enable_adapters(not self._was_disabled[name])
        self._was_disabled.clear()
        self.attached = False


def pack_adapters(components: Mapping[str, torch.nn.Module], adapters: Sequence[str], key: Hashable) -> PackedAdapters:
    """Pack ``adapters`` (active, with their scales already set in peft) in every layer that carries one.

    Layers peft wraps in a way the hook does not reproduce (grouped convs, LoRA variants such as
    DoRA, LoRA biases) are left out and keep peft's own forward, so the sum stays exact.
    """
    layers: dict[str, tuple[LoraLayer, PackedLayer | None]] = {}
    for component, module in components.items():
        for path, layer in module.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            present = [name for name in adapters if name in layer.lora_A]
            if not present or not _packable(layer, present):
                continue
            scaled = [name for name in present if layer.scaling[name] != 0]
            layers[f"{component}.{path}"] = (layer, _pack_layer(layer, scaled) if scaled else None)
    return PackedAdapters(key, layers)


def _packable(layer: LoraLayer, adapters: Sequence[str]) -> bool:
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Conv2d):
        if base.groups != 1:
            return False
    elif not isinstance(base, torch.nn.Linear) or getattr(layer, "fan_in_fan_out", False):
        return False
    return not any(name in layer.lora_variant or layer.lora_bias.get(name, False) for name in adapters)


def _pack_layer(layer: LoraLayer, adapters: Sequence[str]) -> PackedLayer:
    first = layer.lora_A[adapters[0]]
    dtype = first.weight.dtype
    with torch.no_grad():
        down = torch.cat([layer.lora_A[name].weight for name in adapters])
        # Scales go into B in fp32: fp16/bf16 factors are rounded once, after scaling.
        up = torch.cat([layer.lora_B[name].weight.flatten(1).float() * layer.scaling[name] for name in adapters], dim=1)
    if isinstance(first, torch.nn.Conv2d):
        return PackedLayer(down.contiguous(), up.to(dtype).contiguous(), first)
    return PackedLayer(down.flatten(1).contiguous(), up.to(dtype).contiguous(), None)

