"""The dataset folder, scanned once: pictures, their captions and repeats, and what is wrong with them.

``scan_dataset`` finds images, pairs ``name.txt``/``name.caption`` sidecars, reads kohya-style
``N_name`` repeat folders, and measures and hashes each file (header + hash only; pixels are
decoded later, by the loop or the latent cache). Problems become ``DatasetIssue`` rows, never
crashes; only "there is nothing to train on" is an error. ``trainer.data.lint`` turns a scan into
the report the Dataset tab shows before training; ``trainer.data.training_set`` turns it into
the batches a run iterates.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.config.schema import DataConfig
from trainer.core.errors import DatasetError, ImageError
from trainer.data.captions import (
    CAPTION_EXTENSIONS,
    ComposedCaption,
    clean_caption,
    compose_caption,
    read_caption_file,
    split_tags,
    with_trigger,
)
from trainer.data.images import file_sha256, image_extensions, image_info
from trainer.data.masks import MaskSource, find_mask, is_mask_file

Severity = Literal["error", "warning", "info"]

# Pictures people drop in that Pillow cannot read here: say so instead of silently ignoring them.
_UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({".heic", ".heif", ".jxl", ".psd", ".raw", ".cr2", ".nef",
                                           ".dng", ".arw", ".svg", ".avif", ".jp2", ".ico", ".tga"})
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")
_NEGATIVE_REPEAT_FOLDER = re.compile(r"^-(\d+)_(.*)$")


# --- what a scan finds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetIssue:
    """One row of the linter's table: what is wrong with which file, and how to fix it."""

    severity: Severity
    code: str  # stable identifier: "unreadable", "too_small", "duplicate", ...
    path: Path | None  # None for issues about the dataset as a whole
    message: str
    fix: str


@dataclass(frozen=True)
class DatasetItem:
    """One usable picture: its final caption (trigger included), repeats and displayed size."""

    path: Path
    caption: str
    repeats: int
    width: int  # after EXIF rotation
    height: int
    sha256: str
    keep_head: int = 0  # caption tags fixed at the start (keep_tokens, or the tags before '|||')
    keep_tail: int = 0  # caption tags fixed at the end (after a second '|||')
    mask: MaskSource | None = None  # set when masked loss is on and the picture has a mask


@dataclass(frozen=True)
class DatasetScan:
    """Everything ``scan_dataset`` found: usable items plus the problems it skipped or noticed."""

    root: Path
    items: tuple[DatasetItem, ...]
    issues: tuple[DatasetIssue, ...]
    num_files: int  # image files found, unreadable ones included
    mask_files: tuple[Path, ...] = ()  # every name.mask.* file found (masks, not pictures)

    @property
    def num_samples(self) -> int:
        """Samples per epoch: each image counted once per repeat."""
        return sum(item.repeats for item in self.items)

    def folder_of(self, item: DatasetItem) -> str:
        """The folder name kohya metadata files an item under (the root's own name at the top)."""
        parent = item.path.parent
        return self.root.name if parent == self.root else parent.relative_to(self.root).as_posix()

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Per folder, how often each caption tag occurs (kohya's ``ss_tag_frequency``)."""
        counts: dict[str, Counter[str]] = {}
        for item in self.items:
            counts.setdefault(self.folder_of(item), Counter()).update(split_tags(item.caption))
        return {folder: dict(counter) for folder, counter in counts.items()}

    def folder_summary(self) -> dict[str, dict[str, int]]:
        """Per folder, repeats and image count (kohya's ``ss_dataset_dirs``)."""
        summary: dict[str, dict[str, int]] = {}
        for item in self.items:
            entry = summary.setdefault(self.folder_of(item), {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return summary


# --- scanning ------------------------------------------------------------------------------------


def scan_dataset(cfg: DataConfig) -> DatasetScan:
    """Find, measure and caption every image under ``cfg.data``.

    Raises ``DatasetError`` only when there is nothing to look at (no folder, no image files);
    unreadable images, missing captions and odd encodings become issues so the user sees them
    all at once instead of one crash at a time.
    """
    root = _dataset_root(cfg.data)
    paths, issues, mask_files = _find_images(root)
    if not paths:
        unsupported = Counter(i.path.suffix.lower() for i in issues if i.code == "unsupported_format" and i.path)
        if unsupported:
            kinds = ", ".join(f"{n} {ext[1:].upper()}" for ext, n in sorted(unsupported.items()))
            raise DatasetError(f"Found 0 readable images in {root}, only files this program cannot read ({kinds}).",
                               hint="Convert them to PNG or JPEG.")
        raise DatasetError(f"Found 0 images in {root}.",
                           hint="Add .png/.jpg/.webp files, or point --data at the folder that holds them.")

    # Hashing and header reads are I/O and C code that release the GIL: threads overlap them.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        probes = list(pool.map(_probe, paths))

    items: list[DatasetItem] = []
    unrepeated: Counter[Path] = Counter()  # kohya "0_name" folders: their pictures are not trained
    for path, probe in zip(paths, probes, strict=True):
        if isinstance(probe, ImageError):
            issues.append(DatasetIssue("error", "unreadable", path, probe.message,
                                       probe.hint or "Remove the file from the dataset."))
            continue
        (width, height), sha256 = probe
        repeats, class_tokens = _repeats_for(path, root, cfg.repeats)
        if repeats == 0:
            unrepeated[_repeat_folder(path, root)] += 1
            continue
        caption = _caption_for(path, cfg, class_tokens, issues)
        mask = find_mask(path, sha256) if cfg.masked_loss else None
        items.append(DatasetItem(path, caption.text, repeats, width, height, sha256, caption.keep_head,
                                 caption.keep_tail, mask))
    issues += _repeat_folder_issues(paths, root, unrepeated, cfg.repeats)
    if not items and unrepeated:
        raise DatasetError(f"No picture in {root} is trained: every one is in a folder with 0 repeats "
                           f"({', '.join(folder.name for folder in unrepeated)}).",
                           hint="Rename a folder to '1_name' (or more repeats) to train its pictures.")
    return DatasetScan(root, tuple(items), tuple(issues), num_files=len(paths), mask_files=tuple(mask_files))


def _repeat_folder_issues(paths: list[Path], root: Path, unrepeated: Counter[Path], default: int) -> list[DatasetIssue]:
    """kohya's folder names taken at their word, and said: "0_name" is not trained; "-3_name" is no repeat count."""
    issues = [DatasetIssue(
        "warning", "zero_repeats", folder,
        f"{folder.name} has 0 repeats, so its {n} picture{'s' * (n != 1)} {'are' if n != 1 else 'is'} not trained "
        "and not counted in the steps (kohya's meaning of a '0_' folder).",
        f"Rename it to '1_{folder.name.partition('_')[2]}' (or more repeats) to train them.")
        for folder, n in unrepeated.items()]
    negative = Counter(folder for path in paths for folder in path.relative_to(root).parents
                       if folder.name and _NEGATIVE_REPEAT_FOLDER.match(folder.name))
    for folder, n in negative.items():
        issues.append(DatasetIssue(
            "warning", "negative_repeats", root / folder,
            f"{folder.name}: a repeat count cannot be negative; its {n} picture{'s' * (n != 1)} "
            f"{'are' if n != 1 else 'is'} trained as if the folder had no count ({default} repeat{'s' * (default != 1)}).",
            f"Rename it to '{_NEGATIVE_REPEAT_FOLDER.match(folder.name).group(1)}_"
            f"{_NEGATIVE_REPEAT_FOLDER.match(folder.name).group(2)}' (or '1_…'), or '0_…' to leave it out."))
    return issues


def _repeat_folder(path: Path, root: Path) -> Path:
    """The nearest ``N_name`` folder above ``path`` (below ``root``)."""
    folder = path.parent
    while folder != root and not _REPEAT_FOLDER.match(folder.name):
        folder = folder.parent
    return folder


def find_images(root: Path) -> list[Path]:
    """The training pictures under ``root``, in the order a scan sees them (masks and hidden files left out)."""
    return _find_images(Path(root))[0]


def _dataset_root(data: str) -> Path:
    if not data.strip():
        raise DatasetError("No dataset folder is set.",
                           hint="Pass --data with the folder that holds your images, or choose one in the Dataset tab.")
    root = Path(data).expanduser()
    if not root.exists():
        raise DatasetError(f"The dataset folder {root} does not exist.",
                           hint="Check the spelling, or point --data at the folder that holds your images.")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder.",
                           hint="Point --data at the folder that holds your images.")
    return root.resolve()


def _find_images(root: Path) -> tuple[list[Path], list[DatasetIssue], list[Path]]:
    """Image files and mask files under ``root`` in a stable order; hidden entries skipped, symlink loops cut."""
    extensions = image_extensions()
    found: list[Path] = []
    masks: list[Path] = []
    issues: list[DatasetIssue] = []
    visited: set[tuple[int, int]] = set()

    def unreadable_folder(exc: OSError) -> None:  # os.walk would otherwise skip it without a word
        folder = Path(exc.filename) if exc.filename else root
        issues.append(DatasetIssue(
            "warning", "unreadable_folder", folder, f"Cannot open the folder {folder}: {exc.strerror or exc}; "
            "its pictures are skipped.", "Check the folder's permissions."))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable_folder):
        try:
            stat = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in visited:  # a symlink back into a folder already walked
            dirnames[:] = []
            continue
        visited.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):  # dotfiles, macOS "._name" resource forks
                continue
            path = Path(dirpath) / name
            suffix = path.suffix.lower()
            if suffix in extensions:
                (masks if is_mask_file(path) else found).append(path)
            elif suffix in _UNSUPPORTED_IMAGE_EXTENSIONS:
                issues.append(DatasetIssue(
                    "warning", "unsupported_format", path,
                    f"{path.name} is a {suffix[1:].upper()} file, which cannot be read here; it is skipped.",
                    "Convert it to PNG or JPEG."))
    return found, issues, masks


def _probe(path: Path) -> tuple[tuple[int, int], str] | ImageError:
    """Size (after EXIF) and hash of one file, or the error that makes it unusable."""
    try:
        return image_info(path, verify=True), file_sha256(path)
    except ImageError as exc:
        return exc


def _repeats_for(path: Path, root: Path, default: int) -> tuple[int, str]:
    """(repeats, class tokens) from the nearest ``N_name`` folder between ``root`` and ``path``.

    The root's own name is not consulted: the folder the user points at is a container, as in
    kohya, where ``train_data_dir`` holds the ``N_name`` sub-folders.
    """
    folder = path.parent
    while folder != root and root in folder.parents:
        match = _REPEAT_FOLDER.match(folder.name)
        if match:  # "0_name" too: 0 repeats, not trained (kohya)
            return int(match.group(1)), match.group(2).strip()
        folder = folder.parent
    return default, ""


def _caption_for(path: Path, cfg: DataConfig, class_tokens: str, issues: list[DatasetIssue]) -> ComposedCaption:
    """The item's final caption: sidecar (or fallback), prefix/suffix, the trigger word in front."""
    sidecar = next((path.with_suffix(ext) for ext in CAPTION_EXTENSIONS if path.with_suffix(ext).is_file()), None)
    caption = ""
    if sidecar is None:
        # kohya uses an N_name folder's name as the caption of its uncaptioned images
        caption = clean_caption(cfg.default_caption) or class_tokens
        used = f'"{with_trigger(caption, cfg.trigger)}"' if (caption or cfg.trigger) else "an empty caption"
        issues.append(DatasetIssue(
            "warning", "missing_caption", path, f"{path.name} has no caption file; it is trained with {used}.",
            f"Add {path.with_suffix('.txt').name} next to it, type a caption in the grid, or set a default caption."))
    else:
        try:
            caption, encoding = read_caption_file(sidecar)
        except OSError as exc:
            issues.append(DatasetIssue(
                "warning", "unreadable_caption", sidecar, f"Cannot read {sidecar.name}: {exc.strerror or exc}.",
                "Check the file's permissions."))
            encoding = None
        except DatasetError as exc:  # not text at all: trained as if it had no caption, and said so
            issues.append(DatasetIssue("warning", "unreadable_caption", sidecar, exc.message, exc.hint or ""))
            encoding = None
        if encoding is not None:
            issues.append(DatasetIssue(
                "warning", "caption_encoding", sidecar,
                f"{sidecar.name} is not UTF-8; it was read as {encoding}: \"{caption[:60]}\".",
                "Check the accents look right, then save the file as UTF-8."))
        if not caption:
            issues.append(DatasetIssue(
                "warning", "empty_caption", path,
                f"{sidecar.name} is empty; {path.name} is trained with "
                f"{repr(cfg.trigger.strip()) if cfg.trigger.strip() else 'an empty caption'}.",
                "Describe the picture in the caption file (what varies: pose, clothes, background)."))
    return compose_caption(caption, trigger=cfg.trigger, prefix=cfg.caption_prefix, suffix=cfg.caption_suffix,
                           separator=cfg.keep_tokens_separator, keep_tokens=cfg.keep_tokens)


# --- the training set ----------------------------------------------------------------------------






