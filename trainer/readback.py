"""Per-step numbers (loss, stop and save votes) read back to the host without stalling a GPU.

Reading a CUDA tensor on the host (``.item()``, ``float()``) waits until the GPU has finished
everything queued so far, so the next step is only queued once the GPU sits idle. Reading step
k's numbers after step k+1 has been queued keeps the GPU busy: the host waits for step k while
the GPU already computes step k+1. On a CPU there is nothing to overlap and values are read at
once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Reading:
    step: int
    values: torch.Tensor  # on the CPU
    context: Any  # host-side facts of that step (e.g. its learning rate), handed back unchanged


class StepReadback:
    """Queue each step's device tensor; get back the readings that are ready, oldest first."""

    def __init__(self, device: torch.device, lag: int | None = None) -> None:
        self.device = device
        self.lag = (1 if device.type == "cuda" else 0) if lag is None else lag
        self._pending: deque[tuple[int, torch.Tensor, Any, Any]] = deque()

    def push(self, step: int, values: torch.Tensor, context: Any = None) -> list[Reading]:
        """Start copying ``values`` to the host; returns what is due (at most ``lag`` steps stay behind)."""
        values = values.detach()
        if self.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = values.cpu(), None
        self._pending.append((step, host, done, context))
        return self._take(keep=self.lag)

    def drain(self) -> list[Reading]:
        """Everything still pending (waits for the device): before a checkpoint, a stop or the end."""
        return self._take(keep=0)

    def _take(self, keep: int) -> list[Reading]:
        ready = []
        while len(self._pending) > keep:
            step, host, done, context = self._pending.popleft()
            if done is not None:
                done.synchronize()
            ready.append(Reading(step, host, context))
        return ready
