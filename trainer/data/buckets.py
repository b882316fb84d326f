"""Aspect-ratio buckets: each picture trains at the shape nearest its own instead of a square crop.

``make_buckets`` lists the shapes for a resolution (kohya-style: for each width, the tallest
height within the pixel budget), ``assign_bucket`` picks the one nearest a picture's aspect
ratio, and ``fit_to_bucket`` scales the picture to cover it and centre-crops the small excess,
so a tall portrait keeps its head.
"""

from __future__ import annotations

import math

from PIL import Image

Bucket = tuple[int, int]  # (width, height) in pixels


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
