"""Image folders: finding the usable images and their captions, loading pixels, held-out splits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from tuneonce.data.buckets import Size
from tuneonce.data.captions import Stream, item_rng, read_caption

logger = logging.getLogger("tuneonce.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class FolderSpec:
    """One data folder (a concept): its repeats and its own caption settings, loss weight and role.

    ``None`` caption settings inherit the data section's (resolved in dataset.TrainDataset).
    """

    path: Path
    repeats: int = 1
    default_caption: str = ""  # caption of images without a caption file
    caption_extension: str | None = None
    caption_prefix: str = ""  # trigger / class words put before every caption
    caption_dropout: float | None = None
    shuffle_tags: bool | None = None
    keep_tokens: int | None = None
    loss_weight: float = 1.0
    role: str = "train"  # or "regularization"
    prior_prediction: bool = False  # regularization: target = the base model's prediction (adapter off)


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    size: Size  # (width, height) after EXIF rotation
    caption: str
    repeats: int = 1
    concept: int = -1  # index of its folder in the data section's folders; -1: none (validation folder)


def scan_folders(folders: Sequence[FolderSpec], caption_extension: str = ".txt") -> list[ImageRecord]:
    """Every readable image of ``folders`` (not recursive, sorted by name) with its caption.

    Unsupported or unreadable files are skipped with one warning each naming the file; caption
    files and hidden files are skipped silently. A missing folder or no image at all is an error.
    """
    records: list[ImageRecord] = []
    for concept, folder in enumerate(folders):
        extension = folder.caption_extension or caption_extension
        captions = {extension.lower(), caption_extension.lower()}  # the data section's too: a concept may ignore them
        if not folder.path.is_dir():
            raise FileNotFoundError(f"data folder not found: {folder.path}")
        for path in sorted(folder.path.iterdir()):
            if path.name.startswith(".") or path.is_dir() or path.suffix.lower() in captions:
                continue
            if path.stem.endswith("-masklabel"):  # OneTrainer's loss mask of <name>: never an image of its own
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                logger.warning("skipping unsupported file %s (supported: %s)", path, ", ".join(IMAGE_EXTENSIONS))
                continue
            try:
                size = _probe_image(path)
            except Exception as err:  # PIL raises many types for broken files
                logger.warning("skipping unreadable image %s: %s", path, err)
                continue
            caption = read_caption(path, extension, folder.default_caption)
            records.append(ImageRecord(path, size, caption, folder.repeats, concept))
    if not records:
        names = ", ".join(str(f.path) for f in folders)
        raise ValueError(f"no usable images in data folder(s) {names} (supported: {', '.join(IMAGE_EXTENSIONS)})")
    return records


def _probe_image(path: Path) -> Size:
    with Image.open(path) as image:
        image.verify()  # checks the structure (PNG CRCs etc.) without decoding all pixels
    with Image.open(path) as image:  # verify() leaves the image unusable: reopen for size and EXIF
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    if width < 1 or height < 1:
        raise ValueError("empty image")
    return (height, width) if orientation in _ROTATED_ORIENTATIONS else (width, height)


def load_image(path: Path) -> Image.Image:
    """RGB image with EXIF rotation applied and transparency composited onto white."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except Exception as err:
        raise RuntimeError(f"cannot load image {path}: {err}") from err
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(C, H, W) float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def split_records(
    records: Sequence[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Deterministic (train, held-out) split: ``fraction`` of the images (at least one) held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation split fraction must be in (0, 1), got {fraction}")
    if len(records) < 2:
        raise ValueError(f"cannot hold out a validation split from {len(records)} image(s)")
    ordered = sorted(records, key=lambda r: str(r.path))
    held = min(len(ordered) - 1, max(1, round(fraction * len(ordered))))
    order = item_rng(seed, 0, 0, Stream.SPLIT).permutation(len(ordered))
    held_out = {int(i) for i in order[:held]}
    train = [r for i, r in enumerate(ordered) if i not in held_out]
    val = [r for i, r in enumerate(ordered) if i in held_out]
    return train, val
