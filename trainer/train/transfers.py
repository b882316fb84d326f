"""Copies between host and device that never make the host wait for a GPU.

A blocking copy to or from a CUDA device (``.to("cuda")`` of a pageable tensor, ``.item()``,
``float()``) waits until the GPU has finished everything queued so far, so the next step is only
queued once the GPU sits idle. Host tensors go to the device through pinned memory, without
blocking; per-step numbers (loss, stop and save votes) come back one step late: the host waits
for step k while the GPU already computes step k+1. On a CPU there is nothing to overlap and
values are read at once.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a GPU through pinned memory, without blocking."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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


class ParkedModules:
    """Frozen modules kept in host memory while the device doesn't need them.

    Once every latent and caption embedding is cached, the training step uses neither the VAE
    nor the frozen text encoders; on a GPU they would hold ~0.4 GB (SD 1.5) to ~2 GB (SDXL) of its
    memory for nothing. Sampling brings them back for its few seconds.
    """

    def __init__(self, modules: list[torch.nn.Module], device: torch.device, host: torch.device | None = None) -> None:
        self.modules, self.device = modules, device
        self.host = host or torch.device("cpu")
        self.parked = False

    def park(self) -> None:
        if self.device == self.host or self.parked:
            return
        for module in self.modules:
            module.to(self.host)
        self.parked = True

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The modules on the device for the duration (parked again afterwards, even on an error)."""
        if not self.parked:
            yield
            return
        for module in self.modules:
            module.to(self.device)
        self.parked = False
        try:
            yield
        finally:
            self.park()
