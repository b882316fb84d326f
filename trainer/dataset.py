"""The dataset: a folder of pictures and captions turned into deterministic training samples.

Four steps, in the order a run uses them:

1. ``scan_dataset`` walks the folder once: finds images, pairs ``name.txt``/``name.caption``
   sidecars, reads kohya-style ``N_name`` repeat folders, and measures and hashes each file
   (header + hash only; pixels are decoded later, by the loop or the latent cache). Problems
   become ``DatasetIssue`` rows, never crashes; only "there is nothing to train on" is an error.
2. ``lint_dataset`` turns a scan into a ``LintReport`` the Dataset tab shows as a table before
   any training: too-small images, duplicates, caption problems, trigger coverage, the bucket
   histogram and the steps math.
3. Buckets (``make_buckets``/``assign_bucket``/``fit_to_bucket``) keep each picture's shape: it
   is scaled to cover the bucket nearest its aspect ratio and only the small excess is cropped,
   so a tall portrait keeps its head instead of being square-cropped.
4. ``TrainingSet`` is what the loop iterates: repeats expanded, one bucket per batch, and every
   choice (order, flips, caption shuffles, dropout) a pure function of (seed, epoch, position),
   so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.config import DataConfig
from trainer.errors import DatasetError, ImageError
from trainer.images import file_sha256, image_extensions, image_info, load_image

Severity = Literal["error", "warning", "info"]
Bucket = tuple[int, int]  # (width, height) in pixels

CAPTION_EXTENSIONS = (".txt", ".caption")  # first match wins
CLIP_TOKEN_LIMIT = 75  # CLIP's 77-token window minus BOS/EOS
FEW_IMAGES = 5  # below this a LoRA copies its pictures instead of learning the subject

# Pictures people drop in that Pillow cannot read here: say so instead of silently ignoring them.
_UNSUPPORTED_IMAGE_EXTENSIONS = frozenset({".heic", ".heif", ".jxl", ".psd", ".raw", ".cr2", ".nef",
                                           ".dng", ".arw", ".svg", ".avif", ".jp2", ".ico", ".tga"})
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")
_SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}


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


@dataclass(frozen=True)
class DatasetScan:
    """Everything ``scan_dataset`` found: usable items plus the problems it skipped or noticed."""

    root: Path
    items: tuple[DatasetItem, ...]
    issues: tuple[DatasetIssue, ...]
    num_files: int  # image files found, unreadable ones included

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
    paths, issues = _find_images(root)
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
    for path, probe in zip(paths, probes, strict=True):
        if isinstance(probe, ImageError):
            issues.append(DatasetIssue("error", "unreadable", path, probe.message,
                                       probe.hint or "Remove the file from the dataset."))
            continue
        (width, height), sha256 = probe
        repeats, class_tokens = _repeats_for(path, root, cfg.repeats)
        caption = _caption_for(path, cfg, class_tokens, issues)
        items.append(DatasetItem(path, caption, repeats, width, height, sha256))
    return DatasetScan(root, tuple(items), tuple(issues), num_files=len(paths))


def read_caption_file(path: Path) -> tuple[str, str | None]:
    """A sidecar's text, cleaned, plus the name of the fallback encoding used (None for UTF-8).

    Captions written on Windows are often cp1252; decoding them as UTF-8 would crash, and
    silently dropping bytes would change the caption, so fall back and tell the user.
    """
    raw = path.read_bytes()
    attempts = [("utf-8-sig", None), ("cp1252", "Windows-1252"), ("latin-1", "Latin-1")]  # latin-1 never fails
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Notepad's "Unicode" is UTF-16 with a BOM
        attempts.insert(0, ("utf-16", None))
    for codec, fallback_name in attempts:
        try:
            return clean_caption(raw.decode(codec)), fallback_name
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")  # pragma: no cover


def clean_caption(text: str) -> str:
    """One line of comma-separated tags: lines joined with ", ", outer spaces and commas stripped."""
    lines = (line.strip().strip(",").strip() for line in text.replace("\ufeff", "").splitlines())
    return ", ".join(line for line in lines if line)


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether ``trigger`` occurs as a whole word (case-insensitive, as CLIP lower-cases)."""
    if not trigger.strip():
        return False
    return re.search(rf"(?<!\w){re.escape(trigger.strip())}(?!\w)", caption, re.IGNORECASE) is not None


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


def _find_images(root: Path) -> tuple[list[Path], list[DatasetIssue]]:
    """Image files under ``root`` in a stable order; hidden entries skipped, symlink loops cut."""
    extensions = image_extensions()
    found: list[Path] = []
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
                found.append(path)
            elif suffix in _UNSUPPORTED_IMAGE_EXTENSIONS:
                issues.append(DatasetIssue(
                    "warning", "unsupported_format", path,
                    f"{path.name} is a {suffix[1:].upper()} file, which cannot be read here; it is skipped.",
                    "Convert it to PNG or JPEG."))
    return found, issues


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
        if match and int(match.group(1)) >= 1:
            return int(match.group(1)), match.group(2).strip()
        folder = folder.parent
    return default, ""


def _caption_for(path: Path, cfg: DataConfig, class_tokens: str, issues: list[DatasetIssue]) -> str:
    """The item's final caption: sidecar (or fallback), then the trigger word in front."""
    sidecar = next((path.with_suffix(ext) for ext in CAPTION_EXTENSIONS if path.with_suffix(ext).is_file()), None)
    caption = ""
    if sidecar is None:
        # kohya uses an N_name folder's name as the caption of its uncaptioned images
        caption = clean_caption(cfg.default_caption) or class_tokens
        used = f'"{_with_trigger(caption, cfg.trigger)}"' if (caption or cfg.trigger) else "an empty caption"
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
    return _with_trigger(caption, cfg.trigger)


def _with_trigger(caption: str, trigger: str) -> str:
    """Put the trigger first unless it already is one of the caption's tags."""
    trigger = trigger.strip()
    if not trigger:
        return caption
    if trigger.casefold() in (tag.casefold() for tag in split_tags(caption)):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


# --- buckets -------------------------------------------------------------------------------------


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[Bucket]:
    """kohya-style aspect buckets: for each width, the tallest height that fits the pixel budget.

    Every side is a multiple of ``step`` (the VAE factor x the UNet's 8x downsampling, 64 for
    SD, so every feature map divides evenly), within [min_side, max_side] (widened when the
    resolution itself lies outside it), and w x h <= resolution². Taking the tallest height per
    width rather than every pair keeps each bucket's area near the budget: an image never trains
    at a small size just because its aspect ratio happened to match a small bucket. Where two
    buckets share an aspect ratio the larger is kept; the square bucket is always present.
    """
    if step < 1 or resolution < step:
        raise ValueError(f"resolution ({resolution}) must be at least the bucket step ({step})")
    side = resolution // step * step
    area = resolution * resolution
    # A min_side at or above the resolution (tiny test models, low-res runs) would leave only
    # the square bucket; then use half the resolution, the ratio of the defaults at 512 px.
    low = max(step, (min_side if min_side < side else side // 2) // step * step)
    high = max(max_side, side) // step * step
    best: dict[tuple[int, int], Bucket] = {}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height < low:
            continue
        for bucket in ((width, height), (height, width)):
            g = math.gcd(*bucket)
            aspect = (bucket[0] // g, bucket[1] // g)
            if aspect not in best or bucket[0] * bucket[1] > best[aspect][0] * best[aspect][1]:
                best[aspect] = bucket
    best[(1, 1)] = (side, side)
    return sorted(best.values(), key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2
    are equally far from 1:1); ties go to the larger bucket."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def fit_to_bucket(img: Image.Image, bucket: Bucket) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Scale ``img`` to cover ``bucket`` keeping its aspect, then centre-crop the excess.

    Returns (image of exactly ``bucket`` size, crop top-left (y, x) in the scaled image,
    original size (h, w)) -- the last two are what SDXL's size/crop conditioning wants.
    Because the bucket has the nearest aspect ratio, the crop is a few percent of one side.
    """
    bucket_w, bucket_h = bucket
    width, height = img.size
    scale = max(bucket_w / width, bucket_h / height)
    scaled_w = max(bucket_w, round(width * scale))
    scaled_h = max(bucket_h, round(height * scale))
    if scaled_w * scaled_h > 2 * bucket_w * bucket_h:
        # An extreme aspect ratio (a 1x20000 strip) would be scaled to gigabytes before the crop:
        # crop the same region from the source first, then scale only that.
        source_w, source_h = min(width, max(1, round(bucket_w / scale))), min(height, max(1, round(bucket_h / scale)))
        source_left, source_top = (width - source_w) // 2, (height - source_h) // 2
        img = img.crop((source_left, source_top, source_left + source_w, source_top + source_h))
        img = img.resize(bucket, Image.Resampling.LANCZOS)
        return img, ((scaled_h - bucket_h) // 2, (scaled_w - bucket_w) // 2), (height, width)
    if (scaled_w, scaled_h) != (width, height):
        # reducing_gap: shrink by whole factors first, then Lanczos; same look, much faster
        img = img.resize((scaled_w, scaled_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    top, left = (scaled_h - bucket_h) // 2, (scaled_w - bucket_w) // 2
    if (scaled_w, scaled_h) != bucket:
        img = img.crop((left, top, left + bucket_w, top + bucket_h))
    return img, (top, left), (height, width)


# --- captions per step ---------------------------------------------------------------------------


def process_caption(caption: str, *, shuffle: bool, keep_tokens: int, dropout: float,
                    rng: random.Random) -> str:
    """The caption one training step sees: maybe dropped, maybe tag-shuffled.

    Dropout (an empty caption with probability ``dropout``) teaches the unconditional branch
    that CFG needs; shuffling stops the model tying meaning to tag order. The first
    ``keep_tokens`` tags (the trigger, usually) stay in front so they keep their weight.
    """
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


# --- the training set ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRef:
    """One sample of one epoch. Its pixels depend only on (item, bucket, flip), so those three
    are also the key for a latent cache."""

    index: int  # into TrainingSet.items
    bucket: Bucket
    flip: bool
    slot: int  # position in the epoch's shuffled order; seeds this sample's caption shuffle


class TrainingSet:
    """The samples of a run, with every random choice a pure function of (seed, epoch, slot)."""

    def __init__(self, scan: DatasetScan, cfg: DataConfig, resolution: int, bucket_step: int = 64) -> None:
        if not scan.items:
            raise DatasetError(
                f"None of the {scan.num_files} images in {scan.root} can be used.",
                hint="Run the dataset check (Dataset tab or 'lora-studio lint') to see why, then fix or remove them.")
        self.items = scan.items
        self.cfg = cfg
        self.resolution = resolution
        if cfg.buckets:
            max_side = cfg.max_bucket_side or 2 * resolution  # kohya's SDXL 1344x768 needs more than 1024
            self.buckets = make_buckets(resolution, bucket_step, cfg.min_bucket_side, max_side)
        else:
            self.buckets = [(resolution, resolution)]
        self.item_buckets: tuple[Bucket, ...] = tuple(
            assign_bucket(item.width, item.height, self.buckets) for item in self.items)
        self._expanded = tuple(i for i, item in enumerate(self.items) for _ in range(item.repeats))

    @property
    def num_samples(self) -> int:
        """Samples per epoch (images x repeats)."""
        return len(self._expanded)

    @property
    def is_caption_static(self) -> bool:
        """True when every step sees an item's caption unchanged, so text embeddings can be cached."""
        return not self.cfg.shuffle_captions and self.cfg.caption_dropout == 0

    def bucket_counts(self) -> dict[Bucket, int]:
        """Images (not samples) per bucket, widest first: the aspect histogram."""
        counts = Counter(self.item_buckets)
        return {b: counts[b] for b in sorted(counts, key=lambda b: (-b[0] / b[1], -b[0]))}

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch: a batch never mixes buckets, so each bucket rounds up separately."""
        samples = Counter(self.item_buckets[i] for i in self._expanded)
        return sum(math.ceil(n / batch_size) for n in samples.values())

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[SampleRef]]:
        """The batches of ``epoch``, in order; the same arguments always give the same list.

        Samples are shuffled, grouped by bucket in that order, cut into batches (the last
        batch of a bucket may be short) and the batches shuffled again so buckets interleave.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        order_rng = random.Random(_derive_seed(seed, epoch, "order"))
        flip_rng = random.Random(_derive_seed(seed, epoch, "flip"))  # own stream: flip on/off keeps the order
        order = list(self._expanded)
        order_rng.shuffle(order)
        by_bucket: dict[Bucket, list[SampleRef]] = {}
        for slot, index in enumerate(order):
            flip = self.cfg.flip and flip_rng.random() < 0.5
            bucket = self.item_buckets[index]
            by_bucket.setdefault(bucket, []).append(SampleRef(index, bucket, flip, slot))
        batches = [refs[i:i + batch_size] for refs in by_bucket.values() for i in range(0, len(refs), batch_size)]
        order_rng.shuffle(batches)
        return batches

    def caption_for(self, ref: SampleRef, epoch: int, seed: int) -> str:
        """The caption this sample trains with (shuffled/dropped per the config, reproducibly)."""
        caption = self.items[ref.index].caption
        if self.is_caption_static:
            return caption
        rng = random.Random(_derive_seed(seed, epoch, "caption", ref.slot))
        return process_caption(caption, shuffle=self.cfg.shuffle_captions, keep_tokens=self.cfg.keep_tokens,
                               dropout=self.cfg.caption_dropout, rng=rng)

    def load_pixels(self, ref: SampleRef) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """([3, H, W] float tensor in [-1, 1], crop top-left (y, x), original size (h, w)).

        The flip is applied before the crop, so the crop coordinates describe the flipped
        picture, as SDXL's conditioning expects.
        """
        img = load_image(self.items[ref.index].path)
        if ref.flip:
            img = ImageOps.mirror(img)
        fitted, crop_top_left, original_size = fit_to_bucket(img, ref.bucket)
        pixels = torch.from_numpy(np.array(fitted, dtype=np.uint8)).permute(2, 0, 1)
        return pixels.float().div_(127.5).sub_(1.0), crop_top_left, original_size


def _derive_seed(*parts: object) -> int:
    """A stable 64-bit seed from parts (``hash()`` is salted per process for strings)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


# --- lint ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepsPlan:
    """The steps math: images x repeats x epochs / batch = steps, with per-bucket rounding."""

    images: int
    samples_per_epoch: int  # images x repeats
    batch_size: int
    steps_per_epoch: int  # sum over buckets of ceil(samples in bucket / batch)
    epochs: float  # as configured, or implied by a fixed step count
    total_steps: int

    def text(self) -> str:
        samples = (f"{self.images} images per epoch" if self.samples_per_epoch == self.images else
                   f"{self.images} images × repeats = {self.samples_per_epoch} samples per epoch")
        per_epoch = f"{samples} ÷ batch {self.batch_size} → {self.steps_per_epoch} steps per epoch"
        if self.epochs.is_integer():
            return f"{per_epoch} × {int(self.epochs)} epochs = {self.total_steps} steps"
        return f"{per_epoch}; {self.total_steps} steps = {self.epochs:.2f} epochs"


@dataclass(frozen=True)
class LintReport:
    """Everything the Dataset tab shows before training; plain data for a table."""

    root: Path
    num_files: int
    num_images: int  # usable ones
    resolution: int
    issues: tuple[DatasetIssue, ...]  # errors first
    trigger: str
    trigger_count: int  # captions that contain the trigger word
    bucket_counts: dict[Bucket, int] = field(default_factory=dict)
    steps: StepsPlan | None = None

    @property
    def ok(self) -> bool:
        """False when any issue is an error (training would fail or learn garbage)."""
        return not any(issue.severity == "error" for issue in self.issues)

    def count(self, severity: Severity) -> int:
        return sum(issue.severity == severity for issue in self.issues)

    def summary_text(self, max_issues: int = 10) -> str:
        """A few lines for the CLI or a status box; the full table is ``issues``."""
        lines = [f"{self.num_images} usable images of {self.num_files} in {self.root}"]
        if self.steps is not None:
            lines.append(f"Steps: {self.steps.text()}")
        if self.bucket_counts:
            buckets = ", ".join(f"{w}×{h}: {n}" for (w, h), n in self.bucket_counts.items())
            lines.append(f"Buckets at {self.resolution} px: {buckets}")
        if self.trigger.strip():
            lines.append(f'Trigger "{self.trigger.strip()}": in {self.trigger_count} of {self.num_images} captions')
        errors, warnings = self.count("error"), self.count("warning")
        lines.append(f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
                     + (":" if self.issues else ""))
        # One line per kind of problem: 200 missing captions are one thing to fix, not 200.
        groups: dict[tuple[str, str], list[DatasetIssue]] = {}
        for issue in self.issues:
            groups.setdefault((issue.severity, issue.code), []).append(issue)
        for (severity, _), group in list(groups.items())[:max_issues]:
            first, rest = group[0], group[1:]
            line = f"  {severity:<7} {first.message} {first.fix}"
            if rest:
                names = ", ".join(i.path.name for i in rest[:3] if i.path is not None)
                line += f" (+{len(rest)} more like this: {names}{', …' if len(rest) > 3 else ''})"
            lines.append(line)
        if len(groups) > max_issues:
            lines.append(f"  … and {len(groups) - max_issues} more kinds of problem")
        return "\n".join(lines)


def lint_dataset(scan: DatasetScan, cfg: DataConfig, resolution: int,
                 count_tokens: Callable[[str], int] | None, epochs: int, batch_size: int,
                 steps: int = 0, *, bucket_step: int = 64) -> LintReport:
    """Check a scan against the run it is meant for and do the steps math.

    ``count_tokens`` counts a caption's CLIP tokens without BOS/EOS (None skips the length
    check); ``steps`` > 0 means a fixed step count, and the report gives the epochs it implies.
    """
    issues = list(scan.issues)
    issues += _size_issues(scan.items, resolution)
    issues += _duplicate_issues(scan.items)
    issues += _caption_issues(scan, cfg, count_tokens)

    trigger = cfg.trigger.strip()
    trigger_count = sum(has_trigger(item.caption, trigger) for item in scan.items) if trigger else 0
    bucket_counts: dict[Bucket, int] = {}
    plan = None
    if scan.items:
        training_set = TrainingSet(scan, cfg, resolution, bucket_step)
        bucket_counts = training_set.bucket_counts()
        plan = _steps_plan(training_set, batch_size, epochs, steps)
        if len(scan.items) < FEW_IMAGES:
            n = len(scan.items)
            issues.append(DatasetIssue(
                "warning", "few_images", None,
                f"Only {n} usable picture{'s' * (n != 1)}: the LoRA will copy {'them' if n != 1 else 'it'} rather "
                "than learn the subject.",
                "Add more varied pictures (15-50 is typical for a character), different poses and backgrounds."))
    else:
        issues.append(DatasetIssue("error", "no_images", scan.root,
                                   f"None of the {scan.num_files} images in {scan.root} can be read.",
                                   "Fix or remove the files listed as unreadable."))
    issues.sort(key=lambda issue: _SEVERITY_ORDER[issue.severity])  # stable: file order within a severity
    return LintReport(scan.root, scan.num_files, len(scan.items), resolution, tuple(issues),
                      trigger, trigger_count, bucket_counts, plan)


def _steps_plan(training_set: TrainingSet, batch_size: int, epochs: int, steps: int) -> StepsPlan:
    per_epoch = training_set.steps_per_epoch(batch_size)
    total = steps if steps > 0 else per_epoch * epochs
    implied_epochs = steps / per_epoch if steps > 0 else float(epochs)
    return StepsPlan(len(training_set.items), training_set.num_samples, batch_size, per_epoch,
                     implied_epochs, total)


def _size_issues(items: tuple[DatasetItem, ...], resolution: int) -> list[DatasetIssue]:
    """Images whose short side is below the training resolution get upscaled, which blurs them;
    past 4x the result is mush the LoRA would learn as the subject's look."""
    issues = []
    for item in items:
        short = min(item.width, item.height)
        if short >= resolution:
            continue
        severity: Severity = "error" if short * 4 < resolution else "warning"
        issues.append(DatasetIssue(
            severity, "too_small", item.path,
            f"{item.path.name} is {item.width}×{item.height}, smaller than the {resolution} px training "
            f"resolution; it is upscaled {resolution / short:.1f}× and will look soft.",
            "Replace it with a larger original, or lower the resolution."))
    return issues


def _duplicate_issues(items: tuple[DatasetItem, ...]) -> list[DatasetIssue]:
    first_seen: dict[str, Path] = {}
    issues = []
    for item in items:
        original = first_seen.setdefault(item.sha256, item.path)
        if original != item.path:
            issues.append(DatasetIssue(
                "warning", "duplicate", item.path,
                f"{item.path.name} is an exact copy of {original.name}, so that picture trains twice as often.",
                "Delete one copy (or use repeats to weight a picture on purpose)."))
    return issues


def _caption_issues(scan: DatasetScan, cfg: DataConfig,
                    count_tokens: Callable[[str], int] | None) -> list[DatasetIssue]:
    issues = []
    trigger = cfg.trigger.strip()
    reported_empty = {i.path for i in scan.issues if i.code in ("missing_caption", "empty_caption")}
    token_counts: dict[str, int] = {}
    for item in scan.items:
        if not item.caption and item.path not in reported_empty:
            issues.append(DatasetIssue(
                "warning", "empty_caption", item.path, f"{item.path.name} has an empty caption.",
                "Describe the picture in its caption file, or set a trigger word."))
        if count_tokens is not None and item.caption:
            if item.caption not in token_counts:
                token_counts[item.caption] = count_tokens(item.caption)
            n = token_counts[item.caption]
            if n > CLIP_TOKEN_LIMIT:
                issues.append(DatasetIssue(
                    "warning", "caption_too_long", item.path,
                    f"The caption of {item.path.name} is {n} CLIP tokens; only the first {CLIP_TOKEN_LIMIT} "
                    "are read, the rest is ignored.",
                    "Shorten it: fewer, more specific tags, the important ones first."))
        if trigger and not has_trigger(item.caption, trigger):
            issues.append(DatasetIssue(
                "warning", "no_trigger", item.path, f'The caption of {item.path.name} lacks the trigger "{trigger}".',
                "Add the trigger word to the caption."))
    if not trigger:
        issues.append(DatasetIssue(
            "info", "no_trigger", None, "No trigger word is set; the LoRA will be tied to the captions' words only.",
            "Set a rare trigger word (e.g. 'zxq') to switch the LoRA's subject on by name."))
    elif cfg.shuffle_captions and cfg.keep_tokens < 1:
        issues.append(DatasetIssue(
            "warning", "trigger_shuffled", None,
            "Caption shuffling is on with keep_tokens = 0, so the trigger word moves around and loses weight.",
            "Set keep_tokens to 1 to keep the trigger word first."))
    return issues
