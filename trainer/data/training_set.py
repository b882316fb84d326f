"""What the loop iterates: a scanned dataset as deterministic, bucketed training samples.

Repeats are expanded, each batch holds one bucket (``trainer.data.buckets``), and every choice
(order, flips, caption shuffles, tag and caption dropout) is a pure function of (seed, epoch,
position), so a resumed run sees exactly the batches it would have seen. Regularization pictures
(``trainer.data.regularization``) join the training pictures' batches with their balanced
repeats and their own loss weight; masks (``trainer.data.masks``) follow each sample's geometry.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ImageOps

from trainer.config.schema import DataConfig
from trainer.core.errors import DatasetError
from trainer.data.buckets import Bucket, assign_bucket, fit_to_bucket, make_buckets
from trainer.data.captions import process_caption
from trainer.data.images import load_image
from trainer.data.masks import bucket_mask, load_mask
from trainer.data.regularization import RegPlan, plan_regularization
from trainer.data.scan import DatasetScan


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

    def __init__(self, scan: DatasetScan, cfg: DataConfig, resolution: int, bucket_step: int = 64,
                 reg: DatasetScan | None = None) -> None:
        if not scan.items:
            raise DatasetError(
                f"None of the {scan.num_files} images in {scan.root} can be used.",
                hint="Run the dataset check (the Dataset tab, or 'lora-studio train --check') to see why, "
                     "then fix or remove them.")
        # Training pictures first, then the regularization pictures an epoch uses (kohya's balancing).
        self.reg: RegPlan | None = plan_regularization(reg, scan.num_samples)
        self.num_train_items = len(scan.items)
        self.items = scan.items + (self.reg.items if self.reg else ())
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
        return not self.cfg.shuffle_captions and self.cfg.caption_dropout == 0 and self.cfg.tag_dropout == 0

    def is_reg(self, index: int) -> bool:
        """Whether ``items[index]`` is a regularization picture."""
        return index >= self.num_train_items

    def loss_weights(self, refs: list[SampleRef]) -> torch.Tensor | None:
        """[B] per-sample loss weights (``prior_loss_weight`` for reg pictures, 1 otherwise);
        None when every weight is 1."""
        weight = self.cfg.prior_loss_weight
        if weight == 1.0 or not any(self.is_reg(ref.index) for ref in refs):
            return None
        return torch.tensor([weight if self.is_reg(ref.index) else 1.0 for ref in refs], dtype=torch.float32)

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
        item = self.items[ref.index]
        if self.is_caption_static:
            return item.caption
        rng = random.Random(_derive_seed(seed, epoch, "caption", ref.slot))
        trigger = self.cfg.trigger.strip().casefold()
        return process_caption(item.caption, shuffle=self.cfg.shuffle_captions, keep_tokens=item.keep_head,
                               keep_tail=item.keep_tail, dropout=self.cfg.caption_dropout, rng=rng,
                               tag_dropout=self.cfg.tag_dropout, protected={trigger} if trigger else ())

    def load_mask(self, ref: SampleRef) -> torch.Tensor | None:
        """[H, W] loss weights in [0, 1] at the bucket's pixel size, or None (learn everywhere)."""
        item = self.items[ref.index]
        if item.mask is None:
            return None
        mask = load_mask(item.mask, (item.width, item.height))
        return None if mask is None else bucket_mask(mask, ref.flip, ref.bucket)

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
