"""What a run writes beside its weights, so an artist can choose the epoch: samples, epoch/step
LoRA files, the validation loss, ``metrics.jsonl``; at the end the best-epoch hint and the parity
check of the written file.

The loop calls three methods (``start``, ``after_step``, ``finish``) and passes each step's
progress through ``track``; everything here runs on the main process only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from trainer.core.errors import StudioError
from trainer.core.safetensors_header import read_safetensors_header
from trainer.train.epoch_files import due_file, list_saved_loras, save_run_lora
from trainer.train.events import Event, SamplesMade, StepProgress, ValidationMeasured
from trainer.train.metrics import (
    MetricsLog,
    best_saved_epoch,
    read_metrics,
    suggestion_text,
)
from trainer.train.parity import check_written_file
from trainer.train.sampling import make_samples, run_sample_prompts
from trainer.train.validation import ValidationSet, validation_due


class RunOutputs:
    """Built right after the session (before the encoders are parked: validation encodes its pictures)."""

    def __init__(self, session) -> None:
        self.session = session
        run_sample_prompts(session)  # a bad prompt line or sampler name fails now, not at the first sample
        self.validation = ValidationSet(session) if session.validation_scan is not None else None
        self.metrics: MetricsLog | None = None
        self.validated_at = -1

    def start(self, start_step: int) -> Iterator[Event]:
        """Open the metrics file (dropping rows past a resumed checkpoint); a fresh run's base loss."""
        self.metrics = MetricsLog(self.session, start_step)
        if self.validation is not None and start_step == 0:
            yield self.validate(0)

    def track(self, progress: StepProgress) -> StepProgress:
        if self.metrics is not None:
            self.metrics.add({"step": progress.step, "epoch": progress.epoch, "loss": progress.loss,
                              "smoothed_loss": progress.smoothed_loss, "lr": progress.lr})
        return progress

    def after_step(self, step: int, sample_asked: bool) -> Iterator[Event]:
        lora = due_file(self.session, step)
        if sample_asked or lora is not None:  # every saved file has its samples, for picking by eye
            yield self.samples(step)
        if lora is not None:
            yield save_run_lora(self.session, step, lora)
        if self.validation is not None and validation_due(self.session, step):
            yield self.validate(step)

    def samples(self, step: int) -> SamplesMade:
        made = make_samples(self.session, step)
        if self.metrics is not None and self.metrics.tracker is not None:
            from PIL import Image

            self.metrics.add_images(step, {f"sample_{i}": Image.open(path).convert("RGB")
                                           for i, path in enumerate(made.paths)})
        return made

    def validate(self, step: int) -> ValidationMeasured:
        s = self.session
        loss = self.validation.loss(s)
        self.validated_at = step
        event = ValidationMeasured(step, s.epoch_at(step), loss, s.loss_ema)
        if self.metrics is not None:
            self.metrics.add({"step": step, "epoch": event.epoch, "val_loss": loss, "train_loss": s.loss_ema,
                              "lr": s.lr_scheduler.get_last_lr()[0]})
        return event

    def finish(self, step: int, output: Path) -> tuple[list[Event], str, str]:
        """(events, best-epoch hint, parity warning) once ``output`` is written."""
        events: list[Event] = []
        if self.validation is not None and self.validated_at != step and step > 0:
            events.append(self.validate(step))  # a stopped run's last weights get their number too
        suggestion = ""
        if self.validation is not None:
            rows = read_metrics(self.session.run_dir)
            suggestion = suggestion_text(best_saved_epoch(rows, _with_steps(list_saved_loras(output))), rows)
        warning = ""
        samples = self.session.run_dir / "samples"
        if self.session.config.output.check_export and samples.is_dir() and any(samples.glob("step-*-0.png")):
            result = check_written_file(self.session, output, step)
            warning = result.warning(output) if result is not None else ""
        if self.metrics is not None:
            self.metrics.close()
        return events, suggestion, warning


def _with_steps(saved: list) -> list[tuple]:
    """(entry, the step its weights are from, read from its ss_steps) for each readable file."""
    pairs = []
    for entry in saved:
        try:
            _, metadata = read_safetensors_header(entry.path)
            pairs.append((entry, int(metadata["ss_steps"])))
        except (OSError, StudioError, KeyError, ValueError):
            continue
    return pairs
