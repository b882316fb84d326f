"""An exponential moving average of the LoRA weights: smoother than the last step's weights.

After the k-th optimiser step the average moves toward the live weights with
``decay_k = min(decay, k / (k + 9))`` (0 at k = 1, so it starts as a copy): diffusers' ``EMAModel``
warm-up ``(1 + s) / (10 + s)`` with s = k - 1, which keeps a short LoRA run from averaging in its
random-ish first steps for thousands of steps. The average is kept in fp32 next to the weights.
When a run has one, samples and the exported file use it (``applied``), and checkpoints hold it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from trainer.core.errors import CheckpointError


def ema_decay_at(update: int, decay: float) -> float:
    """The decay of the ``update``-th average (1-based)."""
    return min(decay, update / (update + 9)) if update > 1 else 0.0


class LoraEma:
    """The fp32 average of ``params`` (the live LoRA tensors, in the optimiser's order)."""

    def __init__(self, params: list[torch.Tensor], decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params, self.decay, self.updates = list(params), decay, 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average toward the weights as they are after an optimiser step."""
        self.updates += 1
        weight = 1.0 - ema_decay_at(self.updates, self.decay)  # shadow += weight·(p - shadow)
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block (samples, export); the live ones after."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], [s.to(p.dtype) for s, p in zip(self.shadow, self.params)])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], live)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state.get("shadow") or []
        if len(shadow) != len(self.shadow) or any(s.shape != t.shape for s, t in zip(shadow, self.shadow)):
            raise CheckpointError("The checkpoint's EMA weights do not fit this run's LoRA.",
                                  hint="Resume with the same settings, or start a new run with another --output.")
        with torch.no_grad():
            for target, saved in zip(self.shadow, shadow):
                target.copy_(saved)
        self.updates = int(state["updates"])


def averaged(ema: LoraEma | None) -> contextlib.AbstractContextManager:
    """``ema.applied()``, or nothing when the run keeps no average."""
    return ema.applied() if ema is not None else contextlib.nullcontext()
