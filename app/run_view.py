"""How a run looks on the page: progress bar, loss curve, status lines and the runs list.

Pure functions of the run controller's ``RunState`` snapshots, so the watcher in the Train tab
only decides *when* to redraw.
"""

from __future__ import annotations

import math

import pandas as pd

from app.run_records import runs_on_disk
from app.runs import ACTIVE, RunState
from app.studio import Studio

PLOT_POINTS = 400  # points per curve sent to the page
RUN_HEADERS = ["Run", "Status", "Step", "Resumable from", "LoRA file"]
STATUS_LABELS = {
    "queued": "… queued", "preparing": "⚙ preparing", "training": "▶ training", "stopping": "■ stopping",
    "finished": "✔ finished", "stopped": "■ stopped", "failed": "✖ failed", "cancelled": "⊘ cancelled",
}


def format_bytes(size: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_html(run: RunState | None) -> str:
    """The progress bar: step/total, speed, ETA, current loss."""
    if run is None:
        return ('<div class="ls-progress" data-status="idle"><div class="ls-progress-label">'
                'No run yet: choose a dataset and press Start.</div>'
                '<div class="ls-progress-track"><div class="ls-progress-fill" style="width:0%"></div></div></div>')
    total = max(run.total_steps, 1)
    fraction = min(run.step / total, 1.0) if run.total_steps else 0.0
    parts = [f"<b>{run.name}</b>", STATUS_LABELS.get(run.status, run.status)]
    if run.total_steps:
        parts.append(f"step {run.step} / {run.total_steps}")
    if run.start_step:
        parts.append(f"resumed from step {run.start_step}")
    if run.status in ("training", "stopping") and run.it_per_s:
        parts.append(f"{run.it_per_s:.2f} steps/s" if run.it_per_s >= 0.1 else f"{1 / run.it_per_s:.1f} s/step")
        parts.append(f"ETA {format_duration(run.eta_s)}")
    if run.loss is not None:
        parts.append(f"loss {run.loss:.4f}")
    label = " · ".join(parts)
    return (f'<div class="ls-progress" data-status="{run.status}" data-step="{run.step}" '
            f'data-total="{run.total_steps}"><div class="ls-progress-label" id="train-progress-label">{label}</div>'
            f'<div class="ls-progress-track"><div class="ls-progress-fill ls-{run.status}" '
            f'style="width:{fraction * 100:.1f}%"></div></div></div>')


def loss_frame(run: RunState | None) -> pd.DataFrame | None:
    """The loss curve; None until there is a first step (an empty frame would fix the plot's legend empty)."""
    if run is None or not run.losses:
        return None
    rows = []
    stride = max(1, len(run.losses) // PLOT_POINTS)  # a long run is thinned: the browser redraws it often
    for step, loss, smoothed in run.losses[::stride]:
        rows.append({"step": step, "loss": loss, "curve": "loss per step"})
        rows.append({"step": step, "loss": smoothed, "curve": "smoothed"})
    rows += [{"step": step, "loss": loss, "curve": "validation"} for step, loss in validation_points(run)]
    return pd.DataFrame(rows, columns=["step", "loss", "curve"]).astype({"step": "int64", "loss": "float64"})


def validation_points(run: RunState) -> list[tuple[int, float]]:
    """The run's validation losses: live, or from its metrics.jsonl for a run of an earlier session."""
    if run.val_losses or run.active:
        return run.val_losses
    from trainer.train.metrics import read_metrics

    return [(row["step"], row["val_loss"]) for row in read_metrics(run.run_dir) if "val_loss" in row]


def status_markdown(run: RunState | None) -> str:
    if run is None:
        return ""
    lines = []
    if run.status == "failed":
        lines.append(f"✖ **{run.error}**")
    elif run.status in ("finished", "stopped") and run.output is not None:
        verb = "Finished" if run.status == "finished" else f"Stopped at step {run.step} of {run.total_steps}"
        lines.append(f"✔ **{verb}:** `{run.output.name}` ({format_bytes(run.size_bytes)}) in `{run.output.parent}`")
        if run.status == "stopped" and run.checkpoints:
            lines.append(f"It can be resumed from step {run.checkpoints[-1][0]}: choose it under *Resume a run* below.")
    elif run.status == "queued":
        lines.append("… Waiting for the runs before it to finish.")
    if run.device and run.status in ("training", "stopping"):
        lines.append(f"Training on {run.device}: {run.num_images} pictures, {run.total_steps} steps.")
    if run.checkpoints and run.status not in ("finished",):
        lines.append(f"Last checkpoint: step {run.checkpoints[-1][0]}.")
    lines.extend(f"- {notice}" for notice in run.notices[-6:])
    return "\n\n".join(lines[:4]) + ("\n\n" + "\n".join(lines[4:]) if len(lines) > 4 else "")


def latest_runs(studio: Studio) -> list[RunState]:
    """This session's runs, newest first, one per name (a resumed run replaces its stopped attempt)."""
    seen: set[str] = set()
    latest = []
    for run in studio.runs.runs():
        if run.name not in seen:
            seen.add(run.name)
            latest.append(run)
    return latest


def runs_table(studio: Studio) -> list[list[str]]:
    """This session's runs, then earlier runs found on disk."""
    rows, seen = [], set()
    for run in latest_runs(studio):
        seen.add(run.name)
        rows.append([run.name, STATUS_LABELS.get(run.status, run.status), f"{run.step} / {run.total_steps or '?'}",
                     f"step {run.checkpoints[-1][0]}" if run.checkpoints and run.status != "finished" else "",
                     str(run.output) if run.output else ""])
    for record in runs_on_disk(studio.projects.runs_dir):
        if record.name in seen:
            continue
        # Not of this session: a run recorded as still going was cut off (app closed or crashed).
        status = "⚠ interrupted" if record.status in ACTIVE else STATUS_LABELS.get(record.status, record.status)
        rows.append([record.name, status,
                     f"{record.step} / {record.total_steps or '?'}",
                     f"step {record.last_checkpoint}" if record.resumable else "",
                     str(record.output) if record.output.is_file() else ""])
    return rows


def resumable_runs(studio: Studio) -> list[str]:
    active = {run.name for run in studio.runs.runs() if run.active}
    return [r.name for r in runs_on_disk(studio.projects.runs_dir) if r.resumable and r.name not in active]


def run_choices(studio: Studio) -> list[tuple[str, str]]:
    return [(f"{run.name} ({run.status})", run.id) for run in latest_runs(studio)]
