"""Loss masks: one grayscale mask per training image, as loss weights per pixel.

Sources (``data.masked_loss.source``):
- ``masklabel``: ``<name>-masklabel.png`` beside ``<name>.<ext>`` (OneTrainer's naming). Such files are never
  training images themselves (folders.py skips them).
- ``alpha``: the image's own alpha channel (kohya sd-scripts' ``alpha_mask``).

White (255) trains fully, black with ``unmasked_weight``, grey linearly between: w = u + (1 - u)·m, m in [0, 1].
The mask gets the image's EXIF rotation, is resized to the image when its size differs, then takes exactly the
image's crop and flip (the same CropPlan), so cached latents (center crop, both flip states) and their masks agree.
The loop averages w over each latent pixel's area (modules/model/masked_loss.py).

A training image without a mask is skipped with a warning naming it (training it unmasked would teach what the mask
leaves out); a mask that exists but cannot be read is an error naming the file, found when the dataset is built.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from tuneonce.data.buckets import CropPlan, apply_crop

logger = logging.getLogger("tuneonce.data")

MASK_SUFFIX = "-masklabel"
MASK_SOURCES = ("masklabel", "alpha")


@dataclass(frozen=True)
class MaskSettings:
    unmasked_weight: float = 0.0
    source: str = "masklabel"

    @classmethod
    def from_config(cls, cfg: Any) -> MaskSettings | None:
        """None when masked loss is off (``cfg`` is the config's ``data.masked_loss``, a mapping or None)."""
        if cfg is None or isinstance(cfg, MaskSettings):
            return cfg
        get = cfg.get if isinstance(cfg, dict) else (lambda name, default=None: getattr(cfg, name, default))
        if not get("enabled", False):
            return None
        source = get("source", "masklabel")
        if source not in MASK_SOURCES:
            raise ValueError(f"data.masked_loss.source: expected one of {', '.join(MASK_SOURCES)}, got {source!r}")
        weight = float(get("unmasked_weight", 0.0))
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"data.masked_loss.unmasked_weight: must be in [0, 1], got {weight}")
        return cls(unmasked_weight=weight, source=source)


def mask_path(image: Path) -> Path:
    return image.with_name(f"{image.stem}{MASK_SUFFIX}.png")


def is_mask_file(path: Path) -> bool:
    return path.stem.endswith(MASK_SUFFIX)


def check_mask(image: Path, settings: MaskSettings) -> bool:
    """True when `image` has a readable mask; False (with a warning naming it) when it has none; ValueError naming
    the file when the mask is there but broken."""
    if settings.source == "alpha":
        with Image.open(image) as opened:
            has_alpha = opened.mode in ("RGBA", "LA", "PA") or "transparency" in opened.info
        if not has_alpha:
            logger.warning("data.masked_loss: skipping %s: it has no alpha channel (source: alpha)", image)
        return has_alpha
    path = mask_path(image)
    if not path.is_file():
        logger.warning("data.masked_loss: skipping %s: no mask %s", image, path.name)
        return False
    try:
        with Image.open(path) as opened:
            opened.verify()
    except Exception as err:  # PIL raises many types for broken files
        raise ValueError(f"data.masked_loss: cannot read mask {path}: {err}") from err
    return True


def _mask_image(image: Path, settings: MaskSettings) -> Image.Image:
    """The mask as an 8-bit grayscale image the size of the (EXIF-rotated) training image."""
    source = image if settings.source == "alpha" else mask_path(image)
    try:
        with Image.open(source) as opened:
            loaded = ImageOps.exif_transpose(opened)
            loaded.load()
        if settings.source == "alpha":
            mask = loaded.convert("RGBA").getchannel("A")
            return mask
        mask = loaded.convert("L")
        with Image.open(image) as original:
            size = ImageOps.exif_transpose(original).size
    except Exception as err:
        raise ValueError(f"data.masked_loss: cannot read mask {source}: {err}") from err
    return mask if mask.size == size else mask.resize(size, Image.Resampling.LANCZOS)


def mask_weights(image: Path, plan: CropPlan, flipped: bool, settings: MaskSettings) -> torch.Tensor:
    """(1, H, W) float32 loss weights of one item: the mask with the item's crop and flip, w = u + (1 - u)·m."""
    mask = apply_crop(_mask_image(image, settings), plan)
    if flipped:
        mask = ImageOps.mirror(mask)
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
    u = settings.unmasked_weight
    return u + (1.0 - u) * m
