"""Caption changes that can be taken back: every batch of sidecar writes keeps what it replaced.

Anything that rewrites caption files (auto-captioning, bulk edits in the grid) writes through
``CaptionUndo.batch``: before a sidecar changes, its old bytes (or "there was no file") are
stored under ``<dataset>/.lora-studio/caption-undo/<batch>/``, one small file per caption and
written before the caption itself, so even a crash half-way through leaves every change undoable.
``restore`` puts a batch back after recording the present state as a "redo" batch, so an undo can
itself be undone and nothing is ever silently lost; repeated undos walk back through the changes
(redo batches are not undone by a plain "undo", only by name). The folder is hidden, so scans skip it.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from trainer.core.atomic import atomic_write_bytes, atomic_write_text
from trainer.core.errors import DatasetError
from trainer.data.captions import CAPTION_EXTENSIONS

UNDO_FOLDER = Path(".lora-studio") / "caption-undo"
_BATCH_ID = re.compile(r"^\d{8}-\d{6}-\d{6}(-\d+)?$")


@dataclass(frozen=True)
class UndoBatch:
    """One recorded batch of caption changes."""

    id: str
    label: str
    created: float  # unix seconds
    count: int  # captions it changed
    restored: bool  # already put back (its "before undo" batch can redo it)
    undoes: str = ""  # for a redo batch: the id of the batch whose undo it recorded


@dataclass(frozen=True)
class RestoreResult:
    batch: UndoBatch
    restored: int  # sidecars given their old text back
    removed: int  # sidecars deleted because there was none before
    redo: UndoBatch | None  # the batch that holds what the restore replaced


class CaptionWriter:
    """Writes sidecars for one batch, storing each one's old bytes first."""

    def __init__(self, root: Path, folder: Path) -> None:
        self._root, self._folder = root, folder
        self._seen: set[Path] = set()

    @property
    def count(self) -> int:
        return len(self._seen)

    def write(self, sidecar: Path, text: str) -> bool:
        """Set ``sidecar``'s text (one line plus a newline); False when it already said exactly that."""
        data = (text.strip() + "\n").encode("utf-8")
        sidecar = Path(sidecar)
        if sidecar.is_file() and sidecar.read_bytes() == data:
            return False
        self._snapshot(sidecar)
        atomic_write_bytes(sidecar, data)
        return True

    def _snapshot(self, sidecar: Path) -> None:
        resolved = sidecar.resolve()
        if resolved in self._seen:
            return  # the first old content is the one to restore
        relative = _inside(self._root, resolved)
        old = base64.b64encode(resolved.read_bytes()).decode("ascii") if resolved.is_file() else None
        (self._folder / "entries").mkdir(parents=True, exist_ok=True)
        entry = {"path": relative.as_posix(), "old": old}
        atomic_write_text(self._folder / "entries" / f"{len(self._seen):05d}.json", json.dumps(entry))
        self._seen.add(resolved)


class CaptionUndo:
    """The undo history of the captions under one dataset folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.folder = self.root / UNDO_FOLDER

    @contextmanager
    def batch(self, label: str, *, undoes: str = "") -> Iterator[CaptionWriter]:
        """Record every sidecar written inside the ``with`` as one undoable batch (kept even on error)."""
        folder = self._new_batch_folder()
        meta = {"label": label, "created": time.time(), **({"undoes": undoes} if undoes else {})}
        atomic_write_text(folder / "batch.json", json.dumps(meta))
        writer = CaptionWriter(self.root, folder)
        try:
            yield writer
        finally:
            if writer.count == 0:
                (folder / "batch.json").unlink(missing_ok=True)
                _remove_empty(folder)

    def batches(self) -> list[UndoBatch]:
        """Every recorded batch, newest first."""
        if not self.folder.is_dir():
            return []
        found = [self._read(path) for path in self.folder.iterdir() if path.is_dir() and _BATCH_ID.match(path.name)]
        return sorted((b for b in found if b is not None), key=lambda b: b.id, reverse=True)

    def latest(self) -> UndoBatch | None:
        """The newest change not yet undone (what "Undo" takes back; redo batches are not changes)."""
        return next((b for b in self.batches() if not b.restored and not b.undoes), None)

    def restore(self, batch_id: str | None = None) -> RestoreResult:
        """Put the captions of ``batch_id`` (default: the latest) back as they were before it."""
        batch = self.latest() if batch_id is None else next((b for b in self.batches() if b.id == batch_id), None)
        if batch is None:
            raise DatasetError("There is no caption change to undo." if batch_id is None else
                               f"No caption undo batch '{batch_id}' in {self.folder}.",
                               hint="Only changes made by LoRA Studio (auto-captioning, bulk edits) can be undone.")
        folder = self.folder / batch.id
        entries = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((folder / "entries").glob("*.json"))]
        restored = removed = 0
        with self.batch(f"Before undoing: {batch.label}", undoes=batch.id) as redo:
            for entry in entries:
                sidecar = self.root / _inside(self.root, self.root / entry["path"])
                old = None if entry["old"] is None else base64.b64decode(entry["old"])
                current = sidecar.read_bytes() if sidecar.is_file() else None
                if current == old:
                    continue
                redo._snapshot(sidecar)
                if old is None:
                    sidecar.unlink()
                    removed += 1
                else:
                    atomic_write_bytes(sidecar, old)
                    restored += 1
            redo_count = redo.count
        self._mark(folder, restored=True)
        if batch.undoes:  # a redo: the change it undid is in force again, and can be undone again
            self._mark(self.folder / batch.undoes, restored=False)
        redo_batch = self.batches()[0] if redo_count else None
        return RestoreResult(self._read(folder) or batch, restored, removed, redo_batch)

    # --- helpers ---------------------------------------------------------------------------------

    def _mark(self, folder: Path, *, restored: bool) -> None:
        try:
            meta = json.loads((folder / "batch.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        meta.pop("restored_at", None)
        atomic_write_text(folder / "batch.json", json.dumps({**meta, **({"restored_at": time.time()} if restored else {})}))

    def _new_batch_folder(self) -> Path:
        stamp = time.time()
        base = time.strftime("%Y%m%d-%H%M%S", time.localtime(stamp)) + f"-{int(stamp * 1e6) % 1_000_000:06d}"
        for n in range(1000):
            folder = self.folder / (base if n == 0 else f"{base}-{n}")
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                continue
        raise DatasetError(f"Cannot create a caption undo folder in {self.folder}.", hint="Check its permissions.")

    def _read(self, folder: Path) -> UndoBatch | None:
        try:
            meta = json.loads((folder / "batch.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a batch being written, or damaged: not offered
        count = len(list((folder / "entries").glob("*.json"))) if (folder / "entries").is_dir() else 0
        return UndoBatch(folder.name, str(meta.get("label", "")), float(meta.get("created", 0.0)), count,
                         "restored_at" in meta, str(meta.get("undoes", "")))


def _inside(root: Path, path: Path) -> Path:
    """``path`` relative to ``root``; a caption file outside it (a tampered record) is refused."""
    resolved = path.resolve()
    try:
        relative = resolved.relative_to(root)
    except ValueError:
        raise DatasetError(f"{path} is outside the dataset folder {root}.",
                           hint="Caption undo only touches caption files inside the dataset.") from None
    if resolved.suffix.lower() not in CAPTION_EXTENSIONS:
        raise DatasetError(f"{path} is not a caption file.", hint="Caption undo only touches .txt/.caption files.")
    return relative


def _remove_empty(folder: Path) -> None:
    try:
        for child in (folder / "entries", folder):
            if child.is_dir():
                child.rmdir()
    except OSError:
        pass  # not empty after all: keep it
