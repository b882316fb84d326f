"""The engine's interface to its clients: typed progress out, commands in.

``trainer.train.loop.train(config, commands)`` is a generator of these events; the CLI draws a
progress bar from them, the GUI's run controller forwards them to the page. Commands are
flags the loop checks once per step, so Stop takes effect after the current step (with several
processes, whose votes travel with the next step's loss, after the next one).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RunStarted:
    total_steps: int
    start_step: int  # > 0 when resuming
    num_images: int
    batch_size: int
    run_dir: Path
    device: str
    trainable_params: int


@dataclass(frozen=True)
class StepProgress:
    step: int  # optimiser steps done so far (1-based after the first step)
    total_steps: int
    epoch: int
    loss: float  # mean loss of this step
    smoothed_loss: float  # exponential moving average, what a plot should show
    lr: float
    it_per_s: float
    eta_s: float


@dataclass(frozen=True)
class SamplesMade:
    step: int
    paths: tuple[Path, ...]
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: Path


@dataclass(frozen=True)
class LoraSaved:
    """A loadable LoRA written during the run (``output.save_lora_every`` / ``save_lora_every_steps``)."""

    step: int
    epoch: int  # whole epochs done at ``step``
    path: Path
    removed: tuple[Path, ...] = ()  # older files deleted to keep ``output.keep_lora_last``


@dataclass(frozen=True)
class ValidationMeasured:
    """The loss on the held-out pictures at fixed timesteps and noise (comparable across evaluations)."""

    step: int
    epoch: int
    loss: float
    train_loss: float | None  # the smoothed training loss at that step, for the same plot


@dataclass(frozen=True)
class Notice:
    """Something the user should read (a fallback taken, a skipped file, a phase started)."""

    level: str  # "info" | "warning"
    text: str


@dataclass(frozen=True)
class RunFinished:
    step: int
    output: Path  # the exported LoRA
    size_bytes: int
    stopped_early: bool
    extra_outputs: tuple[Path, ...] = ()
    suggestion: str = ""  # which saved epoch had the lowest validation loss (a hint), when measured
    parity_warning: str = ""  # the written file renders differently from the in-training sample


Event = (RunStarted | StepProgress | SamplesMade | CheckpointSaved | LoraSaved | ValidationMeasured | Notice
         | RunFinished)


@dataclass
class RunCommands:
    """Thread-safe flags a client sets and the loop reads once per step."""

    _stop: threading.Event = field(default_factory=threading.Event)
    _save_now: threading.Event = field(default_factory=threading.Event)
    _sample_now: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        """Finish the current step, save a resumable checkpoint, export, and end the run."""
        self._stop.set()

    def save_now(self) -> None:
        self._save_now.set()

    def sample_now(self) -> None:
        self._sample_now.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def take_save_request(self) -> bool:
        """True once per request (the flag is cleared on read)."""
        requested = self._save_now.is_set()
        self._save_now.clear()
        return requested

    def take_sample_request(self) -> bool:
        requested = self._sample_now.is_set()
        self._sample_now.clear()
        return requested
