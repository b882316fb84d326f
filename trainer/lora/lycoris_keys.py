"""LoHa and LoKr layers in LyCORIS's key format, which A1111/Forge and ComfyUI load natively.

Per layer (kohya name ``<name>``), as LyCORIS writes them and peft names its parameters:

- LoHa: ``<name>.hada_w1_a`` [out, r], ``hada_w1_b`` [r, in·kh·kw], ``hada_w2_a``, ``hada_w2_b``
  and ``<name>.alpha``; ΔW = (alpha/r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), r = ``hada_w1_b.shape[0]``.
- LoKr: ``<name>.lokr_w1`` [a, b] (or ``lokr_w1_a``/``lokr_w1_b``), ``lokr_w2`` [c, d(, kh, kw)]
  (or ``lokr_w2_a`` [c, r]/``lokr_w2_b`` [r, d·kh·kw]) and ``alpha``; ΔW = scale · kron(w1, w2)
  with out = a·c, in = b·d. The loaders' scale is alpha / r where r is the rank of a low-rank
  factor (``w2_b``, else ``w1_b``) and 1 when both factors are full, so export folds peft's
  alpha/r into ``lokr_w1`` in that case.

Both have an exact low-rank form (``factors``), which is how Generate hands them to diffusers: a
Hadamard product of two rank-r products has rank at most r² (columns w1_a[:, i]·w2_a[:, j]), and
kron(P1·Q1, P2·Q2) = kron(P1, P2)·kron(Q1, Q2).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from trainer.core.errors import LoraFileError

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
KEY = re.compile(r"^(lora_(?:unet|te|te1|te2)_[^.]+)\.(hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)$")


@dataclass(eq=False)
class LohaModule:
    """One layer's LoHa: ΔW = (alpha / rank) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)."""

    name: str
    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float
    kind = "loha"
    dora_scale = None

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def out_in(self) -> tuple[int, int]:
        return int(self.w1_a.shape[0]), int(self.w1_b.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}

    def delta_weight(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        delta = self.scale * (self.w1_a.float() @ self.w1_b.float()) * (self.w2_a.float() @ self.w2_b.float())
        return delta.reshape(shape) if shape is not None else delta

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [r², in], up [out, r²]) with up @ down = ΔW exactly (the scale is in up)."""
        r = self.rank
        up = (self.w1_a.float()[:, :, None] * self.w2_a.float()[:, None, :]).reshape(-1, r * r)
        down = (self.w1_b.float()[:, None, :] * self.w2_b.float()[None, :, :]).reshape(r * r, -1)
        return down, up * self.scale


@dataclass(eq=False)
class LokrModule:
    """One layer's LoKr: ΔW = scale · kron(w1, w2); each factor full or a low-rank pair."""

    name: str
    parts: dict[str, torch.Tensor]  # lokr_w1 or lokr_w1_a/_b, lokr_w2 or lokr_w2_a/_b
    alpha: float
    kind = "lokr"
    dora_scale = None

    @property
    def rank(self) -> int:
        """The rank loaders divide alpha by (0: no low-rank factor, scale 1)."""
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in self.parts:
                return int(self.parts[key].shape[0])
        return 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 1.0

    def _pair(self, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        full = self.parts.get(f"lokr_{which}")
        if full is not None:
            return full.float().flatten(1), None
        return self.parts[f"lokr_{which}_a"].float(), self.parts[f"lokr_{which}_b"].float()

    def _matrix(self, which: str) -> torch.Tensor:
        a, b = self._pair(which)
        return a if b is None else a @ b

    @property
    def out_in(self) -> tuple[int, int]:
        """(out, in·kh·kw) of the layer."""
        w1, w2 = self._matrix("w1"), self._matrix("w2")
        return int(w1.shape[0] * w2.shape[0]), int(w1.shape[1] * w2.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.parts)

    def delta_weight(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        delta = self.scale * torch.kron(self._matrix("w1"), self._matrix("w2"))
        return delta.reshape(shape) if shape is not None else delta

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) with up @ down = ΔW exactly: kron(P1·Q1, P2·Q2) = kron(P1, P2)·kron(Q1, Q2)."""
        (p1, q1), (p2, q2) = (_split(*self._pair("w1")), _split(*self._pair("w2")))
        return torch.kron(q1, q2), torch.kron(p1, p2) * self.scale


def _split(a: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A factor as P @ Q with the smaller inner size (identity on the short side of a full matrix)."""
    if b is not None:
        return a, b
    rows, cols = a.shape
    return (a, torch.eye(cols)) if cols <= rows else (torch.eye(rows), a)


# --- from a trained model --------------------------------------------------------------------------


def collect_lycoris(name: str, layer, adapter_name: str) -> LohaModule | LokrModule | None:
    """The export module of one peft LoHa/LoKr layer (fp32 copies), or None for other layers."""
    def take(container: str) -> torch.Tensor | None:
        params = getattr(layer, container, None)
        if params is None or adapter_name not in params:
            return None
        return params[adapter_name].detach().float().cpu().clone()

    if getattr(layer, "hada_w1_a", None) is not None and adapter_name in layer.hada_w1_a:
        if adapter_name in getattr(layer, "hada_t1", {}):
            raise LoraFileError(f"{name}: LoHa with Tucker factors (effective conv2d) cannot be exported.")
        alpha = float(layer.alpha[adapter_name])
        return LohaModule(name, *(take(p) for p in LOHA_PARTS), alpha=alpha)
    if getattr(layer, "lokr_w1", None) is not None and (adapter_name in layer.lokr_w1
                                                        or adapter_name in layer.lokr_w1_a):
        parts = {p: t for p in LOKR_PARTS if (t := take(p)) is not None}
        alpha = float(layer.alpha[adapter_name])
        module = LokrModule(name, parts, alpha)
        peft_scale = float(layer.scaling[adapter_name])
        if not module.rank:  # both factors full: loaders use scale 1, so the scale goes into w1
            parts["lokr_w1"] = parts["lokr_w1"] * peft_scale
        elif not math.isclose(module.scale, peft_scale, rel_tol=1e-6):
            raise LoraFileError(f"{name}: LoKr rank {module.rank} does not give peft's scale {peft_scale}.")
        return module
    return None


# --- from a file -------------------------------------------------------------------------------------


def split_lycoris(path_name: str, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(kohya stem -> LoHa/LoKr module, the remaining tensors) of a file's tensors.

    The ``<stem>.alpha`` of a LyCORIS layer goes with it; files with LoHa/LoKr Tucker factors
    (``hada_t1``, ``lokr_t2``) are refused by the caller's key check.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if m := KEY.match(key):
            groups.setdefault(m.group(1), {})[m.group(2)] = tensor
    if not groups:
        return {}, tensors
    rest = {k: v for k, v in tensors.items() if not (KEY.match(k) or k.rsplit(".", 1)[0] in groups)}
    modules: dict = {}
    for stem, parts in groups.items():
        alpha_tensor = tensors.get(f"{stem}.alpha")
        for label, tensor in parts.items():
            if not torch.isfinite(tensor.float()).all():
                raise LoraFileError(f"{path_name}: {stem}.{label} contains NaN or infinite values.",
                                    hint="The file was saved from a diverged run; use an earlier one.")
        if any(p.startswith("hada_") for p in parts):
            missing = [p for p in LOHA_PARTS if p not in parts]
            if missing:
                raise LoraFileError(f"{path_name}: the LoHa layer {stem} lacks {', '.join(missing)}.",
                                    hint="The file is incomplete; export it again.")
            alpha = float(alpha_tensor.item()) if alpha_tensor is not None else float(parts["hada_w1_b"].shape[0])
            module = LohaModule(stem, *(parts[p] for p in LOHA_PARTS), alpha=alpha)
            _check_pairs(path_name, stem, [(module.w1_a, module.w1_b), (module.w2_a, module.w2_b)])
        else:
            for which in ("w1", "w2"):
                if f"lokr_{which}" not in parts and not {f"lokr_{which}_a", f"lokr_{which}_b"} <= set(parts):
                    raise LoraFileError(f"{path_name}: the LoKr layer {stem} lacks lokr_{which}.",
                                        hint="The file is incomplete; export it again.")
            module = LokrModule(stem, parts, 0.0)
            module.alpha = float(alpha_tensor.item()) if alpha_tensor is not None else float(module.rank)
            _check_pairs(path_name, stem, [(parts[f"lokr_{w}_a"], parts[f"lokr_{w}_b"]) for w in ("w1", "w2")
                                           if f"lokr_{w}_a" in parts])
        modules[stem] = module
    return modules, rest


def _check_pairs(path_name: str, stem: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for a, b in pairs:
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise LoraFileError(f"{path_name}: {stem} has factors {tuple(a.shape)} and {tuple(b.shape)}, which do "
                                "not multiply.", hint="The file is malformed; export it again.")


# --- exact sizes before training ---------------------------------------------------------------------


def planned_parts(network_type: str, rank: int, out_features: int, in_features: int,
                  kernel: tuple[int, ...]) -> list[tuple[str, list[int]]]:
    """(key suffix, shape) of the tensors a peft LoHa/LoKr layer exports (mirrors peft's choices)."""
    fan_in = in_features * math.prod(kernel)
    if network_type == "loha":
        return [("hada_w1_a", [out_features, rank]), ("hada_w1_b", [rank, fan_in]),
                ("hada_w2_a", [out_features, rank]), ("hada_w2_b", [rank, fan_in])]
    from peft.tuners.lokr.layer import factorization

    in_m, in_n = factorization(in_features, -1)
    out_l, out_k = factorization(out_features, -1)
    parts = [("lokr_w1", [out_l, in_m])]  # decompose_both is off: w1 is always full
    if rank >= max(out_k, in_n) / 2:  # peft's use_w2
        parts.append(("lokr_w2", [out_k, in_n, *kernel] if kernel else [out_k, in_n]))
    else:
        parts += [("lokr_w2_a", [out_k, rank]), ("lokr_w2_b", [rank, in_n * math.prod(kernel)])]
    return parts
