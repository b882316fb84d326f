"""What a run leaves on disk for the app: ``app-run.json`` next to its LoRA, read back after a restart.

The record (status, step, total, output) lets the runs list survive an app restart, and
``resume_config`` turns a stopped or crashed run's saved config back into one that resumes it.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from app.access import child_path
from trainer.config.schema import StudioConfig, config_from_dict, load_toml
from trainer.core.atomic import atomic_write_text
from trainer.core.errors import StudioError
from trainer.train.checkpoints import list_checkpoints

RECORD_FILE = "app-run.json"

log = logging.getLogger("lora_studio.runs")


@dataclass(frozen=True)
class RunRecord:
    """A run found on disk (this session's or an earlier one's)."""

    name: str
    output: Path
    status: str
    step: int
    total_steps: int
    last_checkpoint: int | None  # step of the newest checkpoint, None when there is none

    @property
    def resumable(self) -> bool:
        return self.last_checkpoint is not None and (self.total_steps == 0 or self.last_checkpoint < self.total_steps)


def read_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_record(run_dir: Path, record: dict) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RECORD_FILE, json.dumps(record, indent=1))
    except (OSError, StudioError) as exc:  # the record is a convenience; never fail a run over it
        log.warning("could not write the run record in %s: %s", run_dir, exc)


def runs_on_disk(runs_dir: Path) -> list[RunRecord]:
    """Every run folder under ``runs_dir`` (``<name>_run/``), newest first."""
    records = []
    if not runs_dir.is_dir():
        return records
    folders = [p for p in runs_dir.iterdir() if p.is_dir() and p.name.endswith("_run")]
    for folder in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True):
        name = folder.name[: -len("_run")]
        data = read_record(folder)
        checkpoints = list_checkpoints(folder / "checkpoints") if (folder / "checkpoints").is_dir() else []
        records.append(RunRecord(
            name=name,
            output=Path(data.get("output") or runs_dir / f"{name}.safetensors"),
            status=str(data.get("status", "unknown")),
            step=int(data.get("step", 0)),
            total_steps=int(data.get("total_steps", 0)),
            last_checkpoint=checkpoints[-1].step if checkpoints else None,
        ))
    return records


def resume_config(runs_dir: Path, name: str) -> StudioConfig:
    """The saved config of run ``name`` with ``resume = "auto"`` (continue from its newest checkpoint)."""
    folder = child_path(runs_dir, f"{name}_run", "run name")
    config_file = folder / "config.toml"
    if not config_file.is_file():
        raise StudioError(f"The run '{name}' has no saved settings ({config_file} is missing).",
                          hint="Start it again as a new run.")
    data = copy.deepcopy(load_toml(config_file))
    data.setdefault("output", {})["resume"] = "auto"
    return config_from_dict(data)
