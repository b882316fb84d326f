"""Caption a dataset folder with a model, in batches, without ever losing a caption.

Modes: ``skip`` (default) leaves pictures that already have a caption alone, ``append`` adds the
model's tags that the caption lacks, ``overwrite`` replaces it. Every file written goes through
the dataset's caption undo (``trainer.data.caption_undo``), so any run can be taken back; the
trigger word goes first, as in hand-written captions. Progress (done, total, ETA) goes to a
callback after each batch; an unreadable picture is skipped with its reason, never fatal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from PIL import Image

from trainer.core.errors import ConfigError, DatasetError, ImageError
from trainer.data.caption_undo import CaptionUndo, UndoBatch
from trainer.data.captions import (
    caption_sidecar,
    read_caption_file,
    split_tags,
    with_trigger,
)
from trainer.data.images import load_image
from trainer.data.scan import find_images

CaptionMode = Literal["skip", "append", "overwrite"]
MODES: tuple[CaptionMode, ...] = ("skip", "append", "overwrite")


class ImageCaptioner(Protocol):
    """A tagger or captioner: pictures in, one caption text each out."""

    kind: str  # "tagger" | "captioner"
    name: str

    def caption_batch(self, images: Sequence[Image.Image]) -> list[str]: ...


@dataclass(frozen=True)
class CaptionProgress:
    done: int  # pictures handled (captioned, skipped or failed)
    total: int
    elapsed_s: float
    current: Path | None = None

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far (None before the first batch)."""
        if not self.done or self.elapsed_s <= 0:
            return None
        return self.elapsed_s / self.done * (self.total - self.done)


@dataclass
class CaptionReport:
    """What a captioning run did."""

    written: list[Path] = field(default_factory=list)  # sidecars changed
    unchanged: list[Path] = field(default_factory=list)  # the model added nothing new
    skipped: list[Path] = field(default_factory=list)  # pictures that had a caption (skip mode)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (picture, reason)
    undo: UndoBatch | None = None  # the batch that takes this run back

    def text(self) -> str:
        parts = [f"Captioned {len(self.written)} picture{'s' * (len(self.written) != 1)}"]
        if self.skipped:
            parts.append(f"left {len(self.skipped)} that already had a caption")
        if self.unchanged:
            parts.append(f"{len(self.unchanged)} unchanged")
        if self.failed:
            names = ", ".join(p.name for p, _ in self.failed[:3])
            parts.append(f"{len(self.failed)} could not be read ({names}{', …' if len(self.failed) > 3 else ''})")
        text = "; ".join(parts) + "."
        return text + (" Undo takes the changes back." if self.undo is not None else "")


def existing_captions(folder: Path) -> dict[Path, str]:
    """Every picture of ``folder`` (sub-folders included) and its current caption ("" = none)."""
    captions = {}
    for image in find_images(_folder(folder)):
        sidecar = caption_sidecar(image)
        captions[image] = read_caption_file(sidecar)[0] if sidecar.is_file() else ""
    return captions


def caption_folder(folder: str | Path, captioner: ImageCaptioner, *, mode: CaptionMode = "skip", trigger: str = "",
                   batch_size: int = 8, on_progress: Callable[[CaptionProgress], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> CaptionReport:
    """Caption every picture under ``folder`` per ``mode``; returns what was written and skipped."""
    if mode not in MODES:
        raise ConfigError(f"Unknown caption mode '{mode}'.", hint=f"Use one of: {', '.join(MODES)}.")
    if batch_size < 1:
        raise ConfigError(f"Batch size {batch_size} is below 1.", hint="Use 1 or more (8 is a good start).")
    root = _folder(folder)
    current = existing_captions(root)
    if not current:
        raise DatasetError(f"Found 0 pictures in {root}.", hint="Add .png/.jpg/.webp files to caption.")
    report = CaptionReport()
    todo = [image for image, caption in current.items() if not (mode == "skip" and caption)]
    report.skipped = [image for image, caption in current.items() if mode == "skip" and caption]
    total, started = len(current), time.perf_counter()
    done = len(report.skipped)
    undo = CaptionUndo(root)
    with undo.batch(f"Auto-caption with {captioner.name} ({mode})") as writer:
        for start in range(0, len(todo), batch_size):
            if should_stop is not None and should_stop():
                break
            batch, pictures = [], []
            for image in todo[start:start + batch_size]:
                try:
                    pictures.append(load_image(image))
                    batch.append(image)
                except ImageError as exc:
                    report.failed.append((image, exc.message))
            captions = captioner.caption_batch(pictures) if pictures else []
            for image, new in zip(batch, captions, strict=True):
                text = with_trigger(merge_captions(current[image], new) if mode == "append" else new, trigger)
                if text and writer.write(caption_sidecar(image), text):
                    report.written.append(image)
                else:
                    report.unchanged.append(image)
            done += len(todo[start:start + batch_size])
            if on_progress is not None:
                on_progress(CaptionProgress(done, total, time.perf_counter() - started,
                                            batch[-1] if batch else None))
        changed = writer.count
    report.undo = undo.latest() if changed else None
    return report


def merge_captions(existing: str, new: str) -> str:
    """``existing`` plus the tags of ``new`` it lacks (compared case-insensitively), in their order."""
    tags = split_tags(existing)
    seen = {tag.casefold() for tag in tags}
    for tag in split_tags(new):
        if tag.casefold() not in seen:
            tags.append(tag)
            seen.add(tag.casefold())
    return ", ".join(tags)


def undo_last_captioning(folder: str | Path) -> str:
    """Restore the captions the newest recorded change replaced; returns a line for the user."""
    result = CaptionUndo(_folder(folder)).restore()
    changed = result.restored + result.removed
    return (f"Undid '{result.batch.label}': {changed} caption{'s' * (changed != 1)} restored"
            f"{f' ({result.removed} removed, as there were none before)' if result.removed else ''}.")


def _folder(folder: str | Path) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{path} is not a folder.", hint="Give the folder that holds the pictures to caption.")
    return path.resolve()
