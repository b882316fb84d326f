"""What the Dataset tab remembers across reloads: the dataset last opened and each dataset's trigger word.

Kept in hidden ``.lora-studio/`` folders (dataset scans skip hidden files): the project's
``.lora-studio/app.json`` names the last dataset, each dataset's ``.lora-studio/dataset.json``
holds its trigger word. A damaged or missing file only means nothing is remembered.
"""

from __future__ import annotations

import json
from pathlib import Path

from app.projects import Projects, safe_name
from trainer.core.atomic import atomic_write_text
from trainer.core.errors import StudioError

MEMORY_FOLDER = ".lora-studio"


def last_dataset(projects: Projects) -> str | None:
    """The dataset opened last, if it still exists; else the first one; None without datasets."""
    names = projects.list_datasets()
    remembered = _read(projects.root / MEMORY_FOLDER / "app.json").get("dataset")
    return remembered if remembered in names else (names[0] if names else None)


def remember_dataset(projects: Projects, name: str) -> None:
    if name in projects.list_datasets():
        _write(projects.root / MEMORY_FOLDER / "app.json", {"dataset": name})


def remembered_trigger(projects: Projects, name: str) -> str:
    folder = _dataset_folder(projects, name)
    return str(_read(folder / MEMORY_FOLDER / "dataset.json").get("trigger", "")) if folder else ""


def remember_trigger(projects: Projects, name: str, trigger: str) -> None:
    folder = _dataset_folder(projects, name)
    if folder is not None:
        path = folder / MEMORY_FOLDER / "dataset.json"
        _write(path, {**_read(path), "trigger": str(trigger or "").strip()})


def _dataset_folder(projects: Projects, name: str) -> Path | None:
    try:
        folder = projects.datasets_dir / safe_name(name, "dataset name")
    except StudioError:
        return None
    return folder if folder.is_dir() else None


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data))
    except (OSError, StudioError):
        pass  # a convenience: never fail an edit over it
