"""Aspect-ratio buckets (SDXL style) and the resize-to-cover + crop that fits an image into one.

Sizes are (width, height) like PIL; the SDXL conditioning values recorded per item
(original_size, crop_top_left, target_size) are (height, width) / (top, left) like diffusers'
``add_time_ids``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (width, height)


def make_buckets(
    resolution: int, *, step: int = 64, min_side: int | None = None, max_side: int | None = None
) -> list[Size]:
    """Bucket sizes with area <= resolution², both sides multiples of ``step`` in [min_side, max_side].

    For every width on the step grid the height is the largest grid value that keeps the area
    within resolution² (so every bucket holds about as many pixels as the square one). Defaults:
    min_side = resolution/2, max_side = 2·resolution (rounded to the grid). Sorted by aspect ratio.
    """
    if resolution < step or step < 8:
        raise ValueError(f"bucket resolution ({resolution}) must be >= bucket step ({step}) and step >= 8")
    if step % 8:
        raise ValueError(f"bucket step must be a multiple of 8 (the VAE downsamples by 8), got {step}")
    min_side = _round_up(min_side if min_side is not None else resolution // 2, step)
    max_side = (max_side if max_side is not None else 2 * resolution) // step * step
    if min_side > max_side:
        raise ValueError(f"bucket min side {min_side} is larger than max side {max_side}")
    area = resolution * resolution
    buckets = {(resolution // step * step,) * 2} if min_side <= resolution // step * step <= max_side else set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets.update({(width, height), (height, width)})  # both orientations, so portrait = landscape
    if not buckets:
        raise ValueError(f"no bucket fits resolution {resolution} with sides in [{min_side}, {max_side}] step {step}")
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def _round_up(value: int, step: int) -> int:
    return max(step, -(-value // step) * step)


def assign_bucket(width: int, height: int, buckets: list[Size]) -> int:
    """Index of the bucket whose aspect ratio is closest (in log scale) to width/height; ties → larger area."""
    log_ratio = math.log(width / height)
    return min(
        range(len(buckets)),
        key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - log_ratio), -buckets[i][0] * buckets[i][1]),
    )


def fit_within(bucket: Size, size: Size, grid: int = 8) -> Size:
    """``bucket`` if an image of ``size`` covers it; otherwise the bucket scaled down (same aspect, sides rounded
    down to the VAE's grid of 8) until the image covers it: kohya's bucket_no_upscale, so small images are cropped
    at their own resolution instead of being upscaled."""
    width, height = size
    if bucket[0] <= width and bucket[1] <= height:
        return bucket
    scale = min(width / bucket[0], height / bucket[1])
    return (max(grid, int(bucket[0] * scale) // grid * grid), max(grid, int(bucket[1] * scale) // grid * grid))


def upscale_factor(size: Size, target: Size) -> float:
    """How much an image of ``size`` is enlarged to cover ``target`` (1 or less: not enlarged)."""
    return max(target[0] / size[0], target[1] / size[1])


@dataclass(frozen=True)
class CropPlan:
    """How an image of some size is scaled and cropped into ``target`` (all (width, height) except crop)."""

    resized: Size
    target: Size
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


def plan_crop(
    size: Size, target: Size, *, random_crop: bool = False, rng: np.random.Generator | None = None
) -> CropPlan:
    """Scale ``size`` to cover ``target`` (keeping aspect) and choose the crop: centered, or uniform random."""
    width, height = size
    target_w, target_h = target
    scale = max(target_w / width, target_h / height)
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    spare_w, spare_h = resized[0] - target_w, resized[1] - target_h
    if random_crop:
        if rng is None:
            raise ValueError("random crop needs a random generator")
        top, left = int(rng.integers(spare_h + 1)), int(rng.integers(spare_w + 1))
    else:
        top, left = spare_h // 2, spare_w // 2
    return CropPlan(resized=resized, target=target, crop_top_left=(top, left))


def apply_crop(image: Image.Image, plan: CropPlan) -> Image.Image:
    """Resize ``image`` to ``plan.resized`` (Lanczos) and cut out ``plan.target`` at ``plan.crop_top_left``."""
    if image.size != plan.resized:
        image = image.resize(plan.resized, Image.Resampling.LANCZOS)
    top, left = plan.crop_top_left
    return image.crop((left, top, left + plan.target[0], top + plan.target[1]))
