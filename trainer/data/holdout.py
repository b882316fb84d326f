"""Validation pictures: held out of the training folder (``validation_split``) or from their own
folder (``validation_data``), never in a training batch.

The split is a pure function of (seed, picture content): the same seed holds out the same
pictures whatever order the files are listed in, and renaming a file does not move it across.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from trainer.config.schema import DataConfig
from trainer.core.errors import DatasetError
from trainer.data.scan import DatasetScan, scan_dataset


def split_validation(scan: DatasetScan, cfg: DataConfig, seed: int) -> tuple[DatasetScan, DatasetScan | None]:
    """(training pictures, validation pictures or None) for ``cfg``'s validation settings."""
    if cfg.validation_data.strip():
        held = scan_dataset(replace(cfg, data=cfg.validation_data.strip(), reg_data="", validation_data=""))
        return scan, held
    if not cfg.validation_split:
        return scan, None
    items = scan.items
    count = max(1, round(len(items) * cfg.validation_split))
    if len(items) - count < 1:
        raise DatasetError(
            f"validation_split = {cfg.validation_split} would hold out all {len(items)} usable pictures.",
            hint="Add pictures, lower validation_split, or give a separate validation_data folder.")
    ranked = sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{seed}:{items[i].sha256}".encode()).hexdigest())
    held = set(ranked[:count])
    train = replace(scan, items=tuple(item for i, item in enumerate(items) if i not in held))
    return train, replace(scan, items=tuple(item for i, item in enumerate(items) if i in held))
