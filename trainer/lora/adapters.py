"""The adapter types (lora, dora, locon, loha, lokr), kohya's per-block ranks and learning rates.

Every type is a peft tuner, so training, merging and dropping adapters stay peft's:

- ``lora``: peft ``LoraConfig``; ``dora`` the same with ``use_dora`` (a learned magnitude per
  output row, ``W = m · (W0 + s·BA) / ‖W0 + s·BA‖_row``: LyCORIS's ``wd_on_out`` convention).
- ``locon``: LoRA on the transformer layers *and* on the UNet's 3×3 convolutions of the ResNet
  blocks and the down/up-samplers (kohya's ``conv_dim``/``conv_alpha``), with ``lora_down`` a
  k×k conv and ``lora_up`` a 1×1 one, as peft's conv LoRA already is. As in kohya, the ResNet
  blocks' ``time_emb_proj`` and 1×1 ``conv_shortcut`` get the network rank.
- ``loha``/``lokr``: peft ``LoHaConfig``/``LoKrConfig`` on the same layers as LoRA.

Blocks are kohya's (``networks/lora.py``, ``get_block_index``): SD1/SD2 have 25 (IN00-IN11, MID,
OUT00-OUT11; a layer's index is 1 + 3·i + j in down block i, 12 for the mid block, 13 + 3·i + j
in up block i, samplers taking slot j = 2), SDXL 23 (BASE, IN0-IN8, MID0-MID2, OUT0-OUT8, OUT: the
SGM block numbers). ``block_dims``/``block_alphas`` set the rank/alpha of the (non-3×3) layers of a
block, a rank of 0 (or a learning-rate factor of 0) leaves the block out; ``block_lr`` multiplies
the block's learning rate. Text-encoder layers belong to no block.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from trainer.config.schema import NetworkConfig
from trainer.core.errors import ConfigError

NETWORK_TYPES: tuple[str, ...] = ("lora", "dora", "locon", "loha", "lokr")
LYCORIS_TYPES: tuple[str, ...] = ("loha", "lokr")
BLOCK_COUNT = {"sd1": 25, "sd2": 25, "sdxl": 23}
_SD_BLOCKS = 12  # kohya's NUM_OF_BLOCKS: IN00-IN11 (and OUT00-OUT11)
_UPDOWN = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_CONV_PARENTS = re.compile(r"(^|\.)(resnets\.\d+\.(conv1|conv2)|(downsamplers|upsamplers)\.\d+\.conv)$")
_RESNET_LINEAR = re.compile(r"(^|\.)resnets\.\d+\.(time_emb_proj|conv_shortcut)$")


def block_names(family: str) -> tuple[str, ...]:
    """kohya's block labels, in block_dims order."""
    if family == "sdxl":
        return ("BASE", *[f"IN{i}" for i in range(9)], "MID0", "MID1", "MID2", *[f"OUT{i}" for i in range(9)], "OUT")
    return (*[f"IN{i:02d}" for i in range(_SD_BLOCKS)], "MID", *[f"OUT{i:02d}" for i in range(_SD_BLOCKS)])


def block_index(path: str, family: str) -> int:
    """kohya's block of a UNet layer (diffusers path); -1 when it belongs to none (conv_in, time embedding)."""
    if path.startswith("mid_block."):
        if family != "sdxl":
            return _SD_BLOCKS
        m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.", path)
        if m is None:
            return -1
        return 10 + (1 if m.group(1) == "attentions" else 2 * int(m.group(2)))  # middle_block.0/1/2
    m = _UPDOWN.match(path)
    if m is None:
        return -1
    kind, i, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    slot = 2 if part in ("downsamplers", "upsamplers") else j
    if family == "sdxl":  # SGM numbering: input_blocks.{3i+j+1} (sampler 3(i+1)), output_blocks.{3i+j}
        return 1 + 3 * i + slot + 1 if kind == "down" else 13 + 3 * i + slot
    return 1 + 3 * i + slot if kind == "down" else _SD_BLOCKS + 1 + 3 * i + slot


def parse_block_values(text: str, label: str, family: str, integer: bool = False) -> list[float] | None:
    """A comma-separated per-block list for ``family`` (None when empty); ConfigError naming the fix."""
    if not text.strip():
        return None
    expected = BLOCK_COUNT[family]
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise ConfigError(f"network.{label} must be comma-separated numbers, got {text!r}.",
                          hint=f"Write {expected} numbers, e.g. {','.join(['4'] * 3)},...") from None
    if len(values) != expected:
        raise ConfigError(f"network.{label} has {len(values)} values, but this model has {expected} UNet blocks "
                          f"({', '.join(block_names(family)[:3])}, ..., {block_names(family)[-1]}).",
                          hint=f"Give exactly {expected} values (kohya's order), or leave it empty.")
    if any(v < 0 or math.isnan(v) for v in values) or (integer and any(v != int(v) for v in values)):
        raise ConfigError(f"network.{label} must hold {'whole ' if integer else ''}numbers of 0 or more: {text!r}.")
    return values


@dataclass(frozen=True)
class BlockPlan:
    """The network's per-block settings for one family (None = the same everywhere)."""

    family: str
    dims: list[float] | None
    alphas: list[float] | None
    lrs: list[float] | None

    @classmethod
    def of(cls, network: NetworkConfig, family: str) -> BlockPlan:
        return cls(family, parse_block_values(network.block_dims, "block_dims", family, integer=True),
                   parse_block_values(network.block_alphas, "block_alphas", family),
                   parse_block_values(network.block_lr, "block_lr", family))

    def lr_factor(self, component: str, path: str) -> float:
        index = block_index(path, self.family) if component == "unet" else -1
        return 1.0 if self.lrs is None or index < 0 else self.lrs[index]

    def rank_alpha(self, network: NetworkConfig, component: str, path: str, conv3x3: bool) -> tuple[int, float]:
        """(rank, alpha) of one layer; rank 0 leaves it out."""
        index = block_index(path, self.family) if component == "unet" else -1
        if index >= 0 and self.lrs is not None and self.lrs[index] == 0:
            return 0, 0.0  # kohya drops blocks that would not learn
        if conv3x3:
            return network.conv_rank or network.rank, network.conv_alpha or network.alpha
        if index < 0 or self.dims is None:
            return network.rank, network.alpha
        alpha = self.alphas[index] if self.alphas is not None else network.alpha
        return int(self.dims[index]), alpha


def is_conv3x3(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)


def locon_conv_targets(unet: torch.nn.Module) -> list[str]:
    """The ResNet-block and sampler convolutions (3×3) plus the ResNets' time_emb_proj/conv_shortcut."""
    targets = []
    for name, module in unet.named_modules():
        conv = _CONV_PARENTS.search(name) and isinstance(module, torch.nn.Conv2d)
        linear = (_RESNET_LINEAR.search(name) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
                  and not is_conv3x3(module))
        if conv or linear:
            targets.append(name)
    return targets


def peft_config(network: NetworkConfig, modules: dict[str, tuple[int, float]]):
    """The peft config of ``network``'s type for ``modules`` (path -> (rank, alpha), ranks > 0)."""
    from peft import LoHaConfig, LoKrConfig
    from peft import LoraConfig as PeftLoraConfig

    ranks = [r for r, _ in modules.values()]
    rank = max(set(ranks), key=ranks.count)
    alphas = [a for r, a in modules.values()]
    alpha = max(set(alphas), key=alphas.count)
    common = {
        "r": rank,
        "target_modules": sorted(modules),
        "rank_pattern": {f"^{re.escape(p)}$": r for p, (r, _) in modules.items() if r != rank},
        "alpha_pattern": {f"^{re.escape(p)}$": a for p, (_, a) in modules.items() if a != alpha},
    }
    if network.network == "loha":
        return LoHaConfig(alpha=alpha, init_weights=True, **common)
    if network.network == "lokr":
        return LoKrConfig(alpha=alpha, init_weights=True, **common)
    return PeftLoraConfig(
        lora_alpha=alpha,
        lora_dropout=network.lora_dropout,
        use_rslora=network.rslora,
        use_dora=network.network == "dora",
        init_lora_weights=True if network.lora_init == "kaiming" else "gaussian",
        bias="none",
        **common,
    )
