"""Regularization (prior-preservation) pictures: class pictures trained beside the subject's.

They come from their own folder (``reg_data``; ``N_name`` sub-folders repeat N times, as in the
training folder) and are captioned by their sidecars, else ``class_prompt``, else an ``N_name``
folder's name; never with the trigger word, prefix or suffix, which belong to the subject.
``balance_reg_repeats`` is kohya's rule for how many of them an epoch holds: as many samples as
the training pictures give (with repeats). Their loss is weighted by ``prior_loss_weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.config.schema import DataConfig
from trainer.core.errors import DatasetError
from trainer.data.scan import DatasetItem, DatasetScan, scan_dataset


@dataclass(frozen=True)
class RegPlan:
    """The regularization pictures one epoch holds, after balancing."""

    scan: DatasetScan
    items: tuple[DatasetItem, ...]  # the pictures used, with their balanced repeats

    @property
    def num_reg_images(self) -> int:
        """kohya's ``ss_num_reg_images``: reg pictures × their own repeats, before balancing."""
        return self.scan.num_samples

    @property
    def samples_per_epoch(self) -> int:
        return sum(item.repeats for item in self.items)

    @property
    def unused(self) -> int:
        """Reg pictures no epoch ever sees (there are more than the training samples)."""
        return len(self.scan.items) - len(self.items)


def scan_regularization(cfg: DataConfig) -> DatasetScan | None:
    """The pictures of ``cfg.reg_data`` (None when it is not set), captioned as class pictures."""
    if not cfg.reg_data.strip():
        return None
    root = Path(cfg.reg_data).expanduser()
    if root.is_file():
        raise DatasetError(f"The regularization folder {root} is a file, not a folder.",
                           hint="Point --reg-data at the folder that holds the class pictures.")
    if not root.is_dir():
        raise DatasetError(f"The regularization folder {root} does not exist.",
                           hint="Check --reg-data, or make class pictures first ('lora-studio reg-images', or "
                                "'Make regularization images' in the Dataset tab).")
    reg_cfg = replace(cfg, data=str(root), trigger="", default_caption=cfg.class_prompt, caption_prefix="",
                      caption_suffix="", repeats=1, reg_data="")
    try:
        return scan_dataset(reg_cfg)
    except DatasetError as exc:
        raise DatasetError(f"Regularization pictures: {exc.message}",
                           hint="Put class pictures (e.g. of 'a woman') in the folder --reg-data names.") from None


def balance_reg_repeats(train_samples: int, reg_items: Sequence[DatasetItem]) -> tuple[DatasetItem, ...]:
    """kohya's balancing: reg pictures, in order and with their own repeats, until their samples
    reach ``train_samples``; then one more repeat each, round-robin, while they fall short.

    A picture is kept whole when its repeats overshoot; pictures after the point where the count
    is reached are not used at all (kohya warns that "some of reg images are not used").
    """
    if train_samples <= 0 or not reg_items:
        return ()
    repeats: list[int] = []
    total = 0
    for item in reg_items:
        repeats.append(item.repeats)
        total += item.repeats
        if total >= train_samples:
            break
    turn = 0
    while total < train_samples:
        repeats[turn % len(repeats)] += 1
        total, turn = total + 1, turn + 1
    return tuple(replace(item, repeats=n) for item, n in zip(reg_items, repeats))


def plan_regularization(reg_scan: DatasetScan | None, train_samples: int) -> RegPlan | None:
    if reg_scan is None:
        return None
    return RegPlan(reg_scan, balance_reg_repeats(train_samples, reg_scan.items))
