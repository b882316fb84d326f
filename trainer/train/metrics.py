"""``run_dir/metrics.jsonl``: one JSON object a line, what the curves and the epoch hint are drawn from.

A training row: ``{"step", "epoch", "loss", "smoothed_loss", "lr"}`` every step; a validation
row: ``{"step", "epoch", "val_loss", "train_loss", "lr"}``. A resumed run first drops the rows
after its checkpoint's step, so the file always describes the weights that exist. With
``output.log_with = "tensorboard"`` the same numbers (and the sample images) also go to
accelerate's TensorBoard tracker under ``run_dir/logs``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainer.core.atomic import atomic_write_text
from trainer.core.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
SUGGESTION_CAVEAT = ("It is only a hint: the loss says how well the LoRA predicts the held-out pictures' noise, "
                     "not how flexible or pleasing it is; compare the epochs' samples (or a grid) before choosing.")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics file (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else ():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class MetricsLog:
    """Appends rows to the run's metrics file (and to TensorBoard when ``output.log_with`` asks)."""

    def __init__(self, session, start_step: int) -> None:
        self.path = session.run_dir / METRICS_FILE
        kept = [row for row in read_metrics(session.run_dir) if row["step"] <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self.tracker = open_tracker(session.config.output.log_with, session.run_dir / "logs")

    def add(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            values = {key: value for key, value in row.items() if key not in ("step", "epoch") and value is not None}
            self.tracker.log(values, step=row["step"])

    def add_images(self, step: int, images: dict[str, Any]) -> None:
        """Sample images, for TensorBoard (the run folder has them as files already)."""
        if self.tracker is not None:
            log_images(self.tracker, step, images)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def log_images(tracker, step: int, images: dict[str, Any]) -> None:
    """PIL images to the tracker, one batch of one per name (the prompts' sizes may differ)."""
    import numpy as np

    for name, image in images.items():
        tracker.log_images({name: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")


def open_tracker(log_with: str, logging_dir: Path):
    """accelerate's TensorBoard tracker writing under ``logging_dir``, or None when ``log_with`` is empty."""
    if not log_with:
        return None
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError(f"output.log_with = {log_with!r} needs the tensorboard package.",
                          hint="pip install 'lora-studio[tensorboard]' (or tensorboard), or leave log_with empty.")
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker("lora-studio", logging_dir)
    tracker.start()
    return tracker


def best_saved_epoch(rows: list[dict[str, Any]], saved: list) -> tuple[Any, float] | None:
    """(the saved file with the lowest validation loss at its step, that loss), or None.

    ``saved`` are ``epoch_files.SavedLora`` entries with their steps known (``step_of`` below); a
    file counts the validation measured at its own step.
    """
    losses = {row["step"]: row["val_loss"] for row in rows if isinstance(row.get("val_loss"), (int, float))}
    scored = [(entry, losses[step]) for entry, step in saved if step in losses and math.isfinite(losses[step])]
    if not scored:
        return None
    return min(scored, key=lambda pair: pair[1])


def suggestion_text(best: tuple[Any, float] | None, rows: list[dict[str, Any]]) -> str:
    """The end-of-run hint: which saved file had the lowest validation loss, and why it is only a hint."""
    if best is None:
        measured = [row for row in rows if "val_loss" in row]
        if not measured:
            return ""
        low = min(measured, key=lambda row: row["val_loss"])
        return (f"The lowest validation loss ({low['val_loss']:.4f}) was at step {low['step']}; save LoRA files "
                f"during the run (--save-lora-every 1) to keep that epoch. {SUGGESTION_CAVEAT}")
    entry, loss = best
    return f"Lowest validation loss: {entry.label} ({entry.path.name}, {loss:.4f}). {SUGGESTION_CAVEAT}"
