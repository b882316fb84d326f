"""The singular values of a LoRA update ΔW = scale·B·A, computed from its factors.

A layer's update is low-rank by construction: B is [out, r], A is [r, in] (a conv's A is
[r, in, kh, kw], flattened to [r, in·kh·kw]). Its SVD never needs the out×in matrix: with thin
QR factorisations B = Q_b R_b and Aᵀ = Q_a R_a,

    ΔW = scale · Q_b (R_b R_aᵀ) Q_aᵀ,   and   scale · R_b R_aᵀ = P Σ Vᵀ   (an r×r SVD),

so ΔW = (Q_b P) Σ (Q_a V)ᵀ. The cost is O((out + in)·r²) instead of O(out·in·min(out, in)).
Everything runs in float64: these matrices are small and the energies we report must add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankSVD:
    """ΔW = u · diag(s) · vh, with s sorted descending (s has min(out, in·k, r) entries)."""

    u: torch.Tensor  # [out, k]
    s: torch.Tensor  # [k]
    vh: torch.Tensor  # [k, in·kh·kw]

    @property
    def energy(self) -> float:
        """‖ΔW‖_F² (the sum of squared singular values)."""
        return float((self.s ** 2).sum())

    def energy_kept(self, rank: int) -> float:
        """Fraction of ‖ΔW‖_F² in the first ``rank`` singular values (1.0 for a zero update)."""
        total = self.energy
        return 1.0 if total == 0 else float((self.s[:rank] ** 2).sum()) / total

    def rank_for_energy(self, fraction: float) -> int:
        """Smallest rank whose singular values hold at least ``fraction`` of the energy (>= 1)."""
        total = self.energy
        if total == 0:
            return 1
        cumulative = torch.cumsum(self.s ** 2, 0) / total
        reached = (cumulative >= fraction - 1e-12).nonzero()
        return int(reached[0]) + 1 if len(reached) else len(self.s)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, rank], down [rank, in·kh·kw]) with up @ down = the best rank-``rank`` ΔW.

        The singular values are split as √σ into both factors, so neither factor dwarfs the other
        (what kohya's resize does); with alpha = rank the file's scale is 1.
        """
        rank = max(1, min(rank, len(self.s)))
        root = self.s[:rank].sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.vh[:rank]


def lowrank_svd(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> LowRankSVD:
    """SVD of ``scale · up @ down`` for up [out, r] (or [out, r, 1, 1]) and down [r, ...]."""
    up2d = up.reshape(up.shape[0], -1).double()
    down2d = down.reshape(down.shape[0], -1).double()
    if up2d.shape[1] != down2d.shape[0]:
        raise ValueError(f"up {tuple(up.shape)} and down {tuple(down.shape)} do not share a rank")
    q_up, r_up = torch.linalg.qr(up2d)  # [out, p], [p, r]
    q_down, r_down = torch.linalg.qr(down2d.T)  # [in, q], [q, r]
    core = scale * (r_up @ r_down.T)  # [p, q]
    p, s, vh = torch.linalg.svd(core, full_matrices=False)
    return LowRankSVD(q_up @ p, s, vh @ q_down.T)


def delta_weight(up: torch.Tensor, down: torch.Tensor, scale: float, weight_shape: torch.Size) -> torch.Tensor:
    """scale · up @ down shaped like the layer's weight ([out, in] or [out, in, kh, kw]), float32."""
    up2d = up.reshape(up.shape[0], -1).float()
    down2d = down.reshape(down.shape[0], -1).float()
    return (scale * (up2d @ down2d)).reshape(weight_shape)
