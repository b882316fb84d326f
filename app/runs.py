"""The run controller: training runs queued and executed one after another in a worker thread.

The page never trains. ``RunController.submit`` puts a validated config in a queue; one worker
thread (started on the first submit, never at import) runs ``trainer.train.loop.train`` for each and
folds its typed events into a ``RunState`` per run. Pages read snapshots of that state (and may
wait for the next change), so a closed browser tab changes nothing: the run goes on and a
reloaded page picks it up again. Stop, Save now and Sample now go to the engine's
``RunCommands`` flags, which the loop reads once per step.

Each run also writes a small ``app-run.json`` next to its LoRA (status, step, total) so the runs
list survives an app restart and a stopped or crashed run can be resumed from its checkpoints.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from app.run_records import read_record, write_record
from trainer.config.schema import StudioConfig
from trainer.core.errors import StudioError
from trainer.train.events import (
    CheckpointSaved,
    Event,
    LoraSaved,
    Notice,
    RunCommands,
    RunFinished,
    RunStarted,
    SamplesMade,
    StepProgress,
    ValidationMeasured,
)
from trainer.train.session import run_dir_for

log = logging.getLogger("lora_studio.runs")

RunStatus = Literal["queued", "preparing", "training", "stopping", "finished", "stopped", "failed", "cancelled"]
ACTIVE: frozenset[str] = frozenset({"queued", "preparing", "training", "stopping"})
MAX_LOSS_POINTS = 2000  # the plot keeps every step up to this, then thins older points
# Said when Save now / Sample now is clicked, and taken back once done (or once the run has ended).
SAVE_PENDING = "A checkpoint will be saved after the current step."
SAMPLES_PENDING = "Sample images will be made after the current step."

TrainFn = Callable[[StudioConfig, RunCommands], Iterator[Event]]


@dataclass
class RunState:
    """What the page shows about one run. Mutated only by the controller, under its lock."""

    id: str
    name: str
    config: StudioConfig
    status: RunStatus = "queued"
    step: int = 0
    start_step: int = 0
    total_steps: int = 0
    num_images: int = 0
    device: str = ""
    it_per_s: float = 0.0
    eta_s: float | None = None
    loss: float | None = None
    losses: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, smoothed)
    samples: list[tuple[Path, str]] = field(default_factory=list)  # (image, caption), oldest first
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    lora_files: list[tuple[int, Path]] = field(default_factory=list)  # (epoch, file) written during the run
    suggestion: str = ""  # the best-epoch hint at the end
    notices: list[str] = field(default_factory=list)
    output: Path | None = None
    size_bytes: int = 0
    error: str = ""
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    earlier_losses: list[tuple[int, float, float]] = field(default_factory=list, repr=False)  # of a resumed run
    version: int = 0  # bumped on every change; watchers wait for it to move
    commands: RunCommands = field(default_factory=RunCommands, repr=False)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def output_path(self) -> Path:
        return Path(self.config.output.output)

    @property
    def run_dir(self) -> Path:
        return run_dir_for(self.config.output.output)

    def snapshot(self) -> RunState:
        """A copy safe to read outside the lock (lists copied, commands shared)."""
        return replace(self, losses=list(self.losses), samples=list(self.samples),
                       checkpoints=list(self.checkpoints), notices=list(self.notices))


class RunController:
    """Queue of training runs, one worker thread, progress state per run."""

    def __init__(self, train_fn: TrainFn | None = None, build_lock: threading.Lock | None = None,
                 before_run: Callable[[str], None] | None = None) -> None:
        self._train_fn = train_fn
        # Called in the worker with the run's device before it loads its model (the Studio uses it to
        # let a generation in flight finish and to unload the generator from that GPU).
        self.before_run = before_run
        # Held while a run builds its model (until its first event): other code that builds modules
        # on the meta device (trainer.lora.sizing) patches torch process-wide and must not overlap it.
        self._build_lock = build_lock or threading.Lock()
        self._runs: dict[str, RunState] = {}
        self._queue: deque[str] = deque()
        self._changed = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closing = False
        self._recorded: dict[str, tuple[str, int]] = {}  # run id -> (status, checkpoints) last recorded

    # --- commands from the page ------------------------------------------------------------------

    def submit(self, name: str, config: StudioConfig) -> RunState:
        """Queue a run; it starts when the runs before it have finished."""
        with self._changed:
            for other in self._runs.values():
                if other.active and other.output_path.resolve() == Path(config.output.output).resolve():
                    raise StudioError(f"The run '{other.name}' is already queued or training.",
                                      hint="Wait for it to finish, or stop it first.")
            run = RunState(id=uuid.uuid4().hex[:12], name=name, config=config)
            if config.output.resume:
                run.earlier_losses = read_record(run.run_dir).get("losses", [])
            self._runs[run.id] = run
            self._queue.append(run.id)
            self._touch(run)
            self._start_worker()
            return run.snapshot()

    def stop(self, run_id: str) -> RunState:
        """Stop a training run after its current step (it saves and exports), or drop a queued one."""
        with self._changed:
            run = self._get(run_id)
            if run.status == "queued":
                self._queue.remove(run.id)
                run.status = "cancelled"
                run.finished_at = time.time()
            elif run.status in ("preparing", "training"):
                run.commands.stop()
                run.status = "stopping"
            self._touch(run)
            return run.snapshot()

    def save_now(self, run_id: str) -> RunState:
        with self._changed:
            run = self._get(run_id)
            if run.status not in ("preparing", "training"):
                raise StudioError(f"'{run.name}' is not training, so there is nothing to save now.")
            run.commands.save_now()
            run.notices.append(SAVE_PENDING)
            self._touch(run)
            return run.snapshot()

    def sample_now(self, run_id: str) -> RunState:
        with self._changed:
            run = self._get(run_id)
            if run.status not in ("preparing", "training"):
                raise StudioError(f"'{run.name}' is not training, so no samples can be made now.")
            run.commands.sample_now()
            run.notices.append(SAMPLES_PENDING)
            self._touch(run)
            return run.snapshot()

    # --- reading ---------------------------------------------------------------------------------

    def get(self, run_id: str) -> RunState:
        with self._changed:
            return self._get(run_id).snapshot()

    def runs(self) -> list[RunState]:
        """Runs of this app session, newest first."""
        with self._changed:
            return [r.snapshot() for r in sorted(self._runs.values(), key=lambda r: r.queued_at, reverse=True)]

    def active_run(self) -> RunState | None:
        """The run training now, else the next queued one."""
        with self._changed:
            training = [r for r in self._runs.values() if r.status in ("preparing", "training", "stopping")]
            if training:
                return training[0].snapshot()
            if self._queue:
                return self._runs[self._queue[0]].snapshot()
            return None

    def training_on(self, device: str) -> RunState | None:
        """The run preparing or training on the same GPU as ``device`` (never on the CPU), if any."""
        with self._changed:
            for run in self._runs.values():
                if run.status in ("preparing", "training", "stopping") and \
                        shares_accelerator(run.device or planned_device(run.config), device):
                    return run.snapshot()
            return None

    def wait_for_change(self, run_id: str, seen_version: int, timeout: float) -> RunState:
        """The run's state once its version differs from ``seen_version`` (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            run = self._get(run_id)
            while run.version == seen_version and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return run.snapshot()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the running run cleanly (checkpoint + export) and end the worker."""
        with self._changed:
            self._closing = True
            for run_id in list(self._queue):
                self._runs[run_id].status = "cancelled"
            self._queue.clear()
            for run in self._runs.values():
                if run.status in ("preparing", "training"):
                    run.commands.stop()
            self._changed.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)

    # --- the worker ------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="lora-studio-runs", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closing:
                    self._changed.wait()
                if self._closing:
                    return
                run = self._runs[self._queue.popleft()]
                run.status = "preparing"
                run.started_at = time.time()
                self._touch(run)
            self._execute(run)

    def _execute(self, run: RunState) -> None:
        train = self._train_fn or _engine_train
        try:
            if self.before_run is not None:
                self.before_run(planned_device(run.config))
            events = train(run.config, run.commands)
            with self._build_lock:
                first = next(events, None)
            for event in itertools.chain([first] if first is not None else [], events):
                with self._changed:
                    apply_event(run, event)
                    self._touch(run)
        except StudioError as exc:
            self._finish(run, "failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker and the queue behind it
            log.exception("training run %s crashed", run.name)
            self._finish(run, "failed", f"Training crashed with an internal error ({type(exc).__name__}: {exc}). "
                                        "This is a bug in LoRA Studio; the log in the terminal has the details.")
        else:
            with self._changed:
                _drop_notices(run, SAVE_PENDING, SAMPLES_PENDING)
                if run.status not in ("finished", "stopped"):  # the engine ended without RunFinished
                    run.status = "stopped" if run.commands.stop_requested else "finished"
                run.finished_at = time.time()
                self._touch(run)
        finally:
            save_record(run)

    def _finish(self, run: RunState, status: RunStatus, error: str) -> None:
        with self._changed:
            _drop_notices(run, SAVE_PENDING, SAMPLES_PENDING)
            run.status = status
            run.error = error
            run.finished_at = time.time()
            self._touch(run)

    def _get(self, run_id: str) -> RunState:
        run = self._runs.get(str(run_id))
        if run is None:
            raise StudioError(f"No run with id '{run_id}' in this session.",
                              hint="Pick a run from the list (runs of an earlier session can be resumed).")
        return run

    def _touch(self, run: RunState) -> None:
        run.version += 1
        self._changed.notify_all()
        # The record on disk only needs what a later session lists: written when the status moves
        # or a checkpoint lands (the step a cut-off run can be resumed from).
        mark = (run.status, len(run.checkpoints))
        if run.status != "queued" and mark != self._recorded.get(run.id):
            self._recorded[run.id] = mark
            save_record(run)


def save_record(run: RunState) -> None:
    """The run's ``app-run.json``: what the runs list shows after a restart, and the loss curve."""
    write_record(run.run_dir, {
        "name": run.name, "status": run.status, "step": run.step, "total_steps": run.total_steps,
        "output": str(run.output_path), "error": run.error,
        "losses": [[step, round(loss, 6), round(smoothed, 6)] for step, loss, smoothed in run.losses]})


def apply_event(run: RunState, event: Event) -> None:
    """Fold one engine event into the run's state."""
    if isinstance(event, RunStarted):
        run.status = "stopping" if run.commands.stop_requested else "training"
        run.total_steps, run.start_step, run.step = event.total_steps, event.start_step, event.start_step
        run.num_images, run.device = event.num_images, event.device
        # A resumed run's curve continues the one it was stopped in.
        run.losses = [tuple(point) for point in run.earlier_losses if point[0] <= event.start_step] + run.losses
    elif isinstance(event, StepProgress):
        run.step, run.total_steps = event.step, event.total_steps
        run.loss, run.it_per_s = event.loss, event.it_per_s
        run.eta_s = event.eta_s if event.eta_s != float("inf") else None
        run.losses.append((event.step, event.loss, event.smoothed_loss))
        if len(run.losses) > MAX_LOSS_POINTS:
            run.losses = run.losses[::2]
    elif isinstance(event, SamplesMade):
        _drop_notices(run, SAMPLES_PENDING)
        for path, prompt in zip(event.paths, event.prompts, strict=False):
            run.samples.append((Path(path), f"step {event.step}: {prompt}"))
    elif isinstance(event, CheckpointSaved):
        _drop_notices(run, SAVE_PENDING)
        run.checkpoints.append((event.step, Path(event.path)))
    elif isinstance(event, ValidationMeasured):
        run.val_losses.append((event.step, event.loss))
    elif isinstance(event, LoraSaved):
        run.lora_files.append((event.epoch, Path(event.path)))
    elif isinstance(event, Notice):
        run.notices.append(("⚠ " if event.level == "warning" else "") + event.text)
    elif isinstance(event, RunFinished):
        run.step = event.step
        run.output, run.size_bytes = Path(event.output), event.size_bytes
        run.status = "stopped" if event.stopped_early else "finished"
        run.eta_s, run.suggestion = 0.0, event.suggestion
        _drop_notices(run, SAVE_PENDING, SAMPLES_PENDING)


def _drop_notices(run: RunState, *texts: str) -> None:
    """Take back "will be done after the current step" notices that are done (or never will be)."""
    run.notices = [notice for notice in run.notices if notice not in texts]


def planned_device(config: StudioConfig) -> str:
    """The device a run will train on, as the engine picks it (``auto``: the first CUDA GPU, else the CPU)."""
    wanted = config.train.device
    if wanted != "auto":
        return wanted
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def shares_accelerator(a: str, b: str) -> bool:
    """Whether two device names are the same GPU (``cuda`` is ``cuda:0``); the CPU is never shared out."""
    import torch

    try:
        first, second = torch.device(a), torch.device(b)
    except (RuntimeError, ValueError):
        return False
    return first.type == second.type != "cpu" and (first.index or 0) == (second.index or 0)


def _engine_train(config: StudioConfig, commands: RunCommands) -> Iterator[Event]:
    from trainer.train.loop import train

    return train(config, commands)


# --- runs on disk --------------------------------------------------------------------------------










