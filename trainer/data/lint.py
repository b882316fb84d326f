"""The dataset check shown before any training: what is wrong with which picture, and the steps math.

``lint_dataset`` checks a scan against the run it is meant for -- too-small images, duplicates,
caption problems, trigger coverage, masks, regularization pictures -- and adds the bucket
histogram and the steps math ((images x repeats + reg samples) x epochs / batch = steps) into a
``LintReport`` the Dataset tab shows as a table and the CLI prints with ``--check``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config.schema import DataConfig
from trainer.data.buckets import Bucket
from trainer.data.captions import has_trigger
from trainer.data.masks import mask_problems
from trainer.data.regularization import RegPlan, scan_regularization
from trainer.data.scan import DatasetIssue, DatasetItem, DatasetScan, Severity
from trainer.data.training_set import TrainingSet

CLIP_TOKEN_LIMIT = 75  # CLIP's 77-token window minus BOS/EOS
FEW_IMAGES = 5  # below this a LoRA copies its pictures instead of learning the subject
_SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class StepsPlan:
    """The steps math: images x repeats x epochs / batch = steps, with per-bucket rounding."""

    images: int
    samples_per_epoch: int  # images x repeats
    batch_size: int
    steps_per_epoch: int  # sum over buckets of ceil(samples in bucket / batch)
    epochs: float  # as configured, or implied by a fixed step count
    total_steps: int
    reg_images: int = 0  # regularization pictures used (after balancing)
    reg_samples_per_epoch: int = 0  # their balanced repeats, summed
    folders: tuple[str, ...] = ()  # "10_a (5 × 10)" per trained folder, shown when some folder is left out
    left_out: tuple[str, ...] = ()  # kohya "0_name" folders: not trained, not counted

    def text(self) -> str:
        samples = (f"{self.images} images per epoch" if self.samples_per_epoch == self.images else
                   f"{self.images} images × repeats = {self.samples_per_epoch} samples per epoch")
        if self.reg_samples_per_epoch:
            samples += (f" + {self.reg_samples_per_epoch} regularization samples (from {self.reg_images} "
                        f"class pictures)")
        per_epoch = f"{samples} ÷ batch {self.batch_size} → {self.steps_per_epoch} steps per epoch"
        if self.epochs.is_integer():
            text = f"{per_epoch} × {int(self.epochs)} epochs = {self.total_steps} steps"
        else:
            text = f"{per_epoch}; {self.total_steps} steps = {self.epochs:.2f} epochs"
        if self.left_out:
            text += f" (counted: {', '.join(self.folders)}; not counted, 0 repeats: {', '.join(self.left_out)})"
        return text


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
                 steps: int = 0, *, bucket_step: int = 64, reg_scan: DatasetScan | None = None) -> LintReport:
    """Check a scan against the run it is meant for and do the steps math.

    ``count_tokens`` counts a caption's CLIP tokens without BOS/EOS (None skips the length
    check); ``steps`` > 0 means a fixed step count, and the report gives the epochs it implies.
    ``reg_scan``: the regularization pictures, scanned here from ``cfg.reg_data`` when not given.
    """
    if reg_scan is None:
        reg_scan = scan_regularization(cfg)
    issues = list(scan.issues)
    issues += _size_issues(scan.items, resolution)
    issues += _duplicate_issues(scan.items)
    issues += _caption_issues(scan, cfg, count_tokens)
    masked = sum(item.mask is not None for item in scan.items)
    issues += [DatasetIssue(p.severity, p.code, p.path, p.message, p.fix) for p in mask_problems(
        ((item.path, (item.width, item.height)) for item in scan.items), scan.mask_files, cfg.masked_loss, masked)]

    trigger = cfg.trigger.strip()
    trigger_count = sum(has_trigger(item.caption, trigger) for item in scan.items) if trigger else 0
    bucket_counts: dict[Bucket, int] = {}
    plan = None
    if scan.items:
        training_set = TrainingSet(scan, cfg, resolution, bucket_step, reg=reg_scan)
        bucket_counts = training_set.bucket_counts()
        plan = _steps_plan(scan, training_set, batch_size, epochs, steps)
        if training_set.reg is not None:
            issues += _reg_issues(training_set.reg, cfg)
        if batch_size > training_set.num_samples:
            issues.append(DatasetIssue(
                "warning", "batch_too_big", None,
                f"The batch size {batch_size} is more than the {training_set.num_samples} samples of an epoch: "
                f"every batch holds at most {training_set.num_samples}, so each step learns from fewer pictures "
                "than planned.",
                f"Use a batch size of {training_set.num_samples} or less, or add pictures or repeats."))
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


def _steps_plan(scan: DatasetScan, training_set: TrainingSet, batch_size: int, epochs: int, steps: int) -> StepsPlan:
    per_epoch = training_set.steps_per_epoch(batch_size)
    total = steps if steps > 0 else per_epoch * epochs
    implied_epochs = steps / per_epoch if steps > 0 else float(epochs)
    reg = training_set.reg
    reg_samples = reg.samples_per_epoch if reg else 0
    left_out = tuple(issue.path.name for issue in scan.issues if issue.code == "zero_repeats" and issue.path)
    folders = tuple(f"{name} ({entry['img_count']} × {entry['n_repeats']})"
                    for name, entry in scan.folder_summary().items()) if left_out else ()
    return StepsPlan(training_set.num_train_items, training_set.num_samples - reg_samples, batch_size, per_epoch,
                     implied_epochs, total, len(reg.items) if reg else 0, reg_samples, folders, left_out)


def _reg_issues(reg: RegPlan, cfg: DataConfig) -> list[DatasetIssue]:
    """The reg folder's unreadable files, uncaptioned pictures (one row) and unused pictures."""
    issues = [DatasetIssue(i.severity, i.code, i.path, f"Regularization picture: {i.message}", i.fix)
              for i in reg.scan.issues if i.code not in ("missing_caption", "empty_caption")]
    uncaptioned = [item for item in reg.scan.items if not item.caption]
    if uncaptioned:
        issues.append(DatasetIssue(
            "warning", "reg_no_caption", reg.scan.root,
            f"{len(uncaptioned)} regularization picture{'s have' if len(uncaptioned) != 1 else ' has'} no caption "
            "and train with an empty one.", "Set a class prompt (--class-prompt, e.g. 'a woman') or add .txt files."))
    if reg.unused:
        issues.append(DatasetIssue(
            "info", "reg_unused", reg.scan.root,
            f"{reg.unused} of {len(reg.scan.items)} regularization pictures are never used: an epoch holds as many "
            f"regularization samples as training samples ({reg.samples_per_epoch}).",
            "Fine as it is; add repeats to the training pictures to use more of them."))
    return issues


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
