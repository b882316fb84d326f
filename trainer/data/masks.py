"""Loss masks: which part of a picture the LoRA learns (white) and which it ignores (black).

A picture's mask is ``name.mask.png`` beside it (its red channel; any picture format works), or
else the picture's own alpha channel. It goes through the same flip, scale and crop as the
picture, then down to the latent grid by area averaging (kohya's ``F.interpolate(mode="area")``),
where it multiplies the per-latent-pixel loss: a black region contributes exactly nothing. The
linter's mask checks (wrong size, unreadable, all black, masks without a picture) live here too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from trainer.core.errors import ImageError
from trainer.data.buckets import Bucket, fit_to_bucket
from trainer.data.images import (
    file_sha256,
    image_extensions,
    image_info,
    load_alpha,
    load_image,
)

MASK_MARK = ".mask"  # img.png -> img.mask.png


@dataclass(frozen=True)
class MaskSource:
    """Where a picture's mask comes from, and a key that changes whenever the mask does."""

    kind: Literal["file", "alpha"]
    path: Path  # the mask file, or the picture itself for an alpha mask
    key: str  # for the latent cache: the mask file's hash, or the picture's (its alpha is in it)


def is_mask_file(path: Path) -> bool:
    """``name.mask.png`` (any picture extension): a mask, never a training picture."""
    return path.suffix.lower() in image_extensions() and path.stem.lower().endswith(MASK_MARK)


def mask_file_for(image: Path) -> Path | None:
    """The ``name.mask.*`` file beside ``image``, PNG first; None when there is none."""
    for ext in (".png", *sorted(image_extensions() - {".png"})):
        candidate = image.with_name(f"{image.stem}{MASK_MARK}{ext}")
        if candidate.is_file():
            return candidate
    return None


def find_mask(image: Path, image_sha256: str) -> MaskSource | None:
    """The picture's mask source (mask file first, then an alpha channel); None: learn everywhere."""
    file = mask_file_for(image)
    if file is not None:
        return MaskSource("file", file, "f" + file_sha256(file)[:16])
    try:
        has_alpha = load_alpha(image) is not None
    except ImageError:
        return None  # the scan reports the picture itself as unreadable
    return MaskSource("alpha", image, "a" + image_sha256[:16]) if has_alpha else None


def load_mask(source: MaskSource, image_size: tuple[int, int]) -> Image.Image | None:
    """The upright mask as an "L" image of ``image_size`` (w, h); None when it masks nothing out.

    A mask of another size than its picture is stretched over it (the linter flags it as an error).
    """
    if source.kind == "alpha":
        mask = load_alpha(source.path)
    else:
        mask = load_image(source.path).getchannel("R")  # kohya reads the red channel; grey masks are equal in all
    if mask is None or mask.getextrema()[0] == 255:
        return None
    return mask if mask.size == image_size else mask.resize(image_size, Image.Resampling.BILINEAR)


def bucket_mask(mask: Image.Image, flip: bool, bucket: Bucket) -> torch.Tensor:
    """[H, W] float weights in [0, 1] at the bucket's pixel size, geometry exactly as the picture's."""
    if flip:
        mask = ImageOps.mirror(mask)
    fitted, _, _ = fit_to_bucket(mask, bucket)
    return torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)


def latent_mask(pixels_mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[1, h, w]: the pixel mask averaged over each latent pixel's area (kohya's downsampling)."""
    return F.interpolate(pixels_mask[None, None], size=latent_hw, mode="area")[0]


def apply_mask(loss_map: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Weight a [B, C, h, w] per-element loss by a [B, 1, h, w] mask (None: unchanged).

    Normalised afterwards by the element count, not the mask's sum, as kohya does: a mostly
    masked picture contributes less, and a black region exactly nothing.
    """
    return loss_map if mask is None else loss_map * mask.to(loss_map.dtype)


# --- the linter's checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskProblem:
    """One mask finding; ``trainer.data.lint`` turns it into a DatasetIssue row."""

    severity: Literal["error", "warning", "info"]
    code: str
    path: Path | None
    message: str
    fix: str


def mask_problems(images: Iterable[tuple[Path, tuple[int, int]]], mask_files: Iterable[Path],
                  masked_loss: bool, masked_count: int = 0) -> list[MaskProblem]:
    """Wrong-size, unreadable and all-black masks, masks without a picture, masks unused or missing.

    ``images`` are (path, (width, height)) of the usable pictures; ``mask_files`` every
    ``name.mask.*`` file the scan found; ``masked_count`` the pictures with any mask (file or
    transparency), known when masked loss is on.
    """
    problems: list[MaskProblem] = []
    images = list(images)
    stems = {path.with_suffix("") for path, _ in images}
    with_mask = 0
    for image, size in images:
        file = mask_file_for(image)
        if file is None:
            continue
        with_mask += 1
        try:
            mask_size = image_info(file)
        except ImageError as exc:
            problems.append(MaskProblem("error", "mask_unreadable", image, f"Its mask: {exc.message}",
                                        exc.hint or "Save the mask again as a PNG."))
            continue
        if mask_size != size:
            problems.append(MaskProblem(
                "error", "mask_size", image,
                f"{file.name} is {mask_size[0]}×{mask_size[1]} but {image.name} is {size[0]}×{size[1]}; "
                "training would stretch the mask over the picture.",
                "Save the mask at the picture's exact size (white = learn, black = ignore)."))
        elif masked_loss and load_image(file).getchannel("R").getextrema()[1] == 0:
            problems.append(MaskProblem(
                "warning", "mask_empty", image, f"{file.name} is all black, so {image.name} teaches nothing.",
                "Paint the part to learn white, or delete the mask."))
    for file in mask_files:
        stem = file.with_name(file.stem[: -len(MASK_MARK)])
        if stem not in stems:
            problems.append(MaskProblem(
                "warning", "mask_orphan", file, f"{file.name} is a mask, but there is no picture {stem.name}.*.",
                "Name it after its picture (img.png → img.mask.png), or delete it."))
    if with_mask and not masked_loss:
        problems.append(MaskProblem(
            "info", "masks_unused", None,
            f"{with_mask} picture{'s have' if with_mask != 1 else ' has'} a mask file, but masked loss is off: "
            "the whole picture is learned.", "Turn on masked loss (--masked-loss) to learn only the white part."))
    if masked_loss and not masked_count:
        problems.append(MaskProblem(
            "warning", "no_masks", None,
            "Masked loss is on, but no picture has a mask (name.mask.png beside it, or transparency).",
            "Add name.mask.png files (white = learn, black = ignore), or turn masked loss off."))
    return problems
