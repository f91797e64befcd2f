"""Caption reading and augmentation (dropout, tag shuffling with fixed leading tags), and the
seeded per-item random streams every augmentation draws from.

Reproducibility rule: each augmentation of item ``index`` in ``epoch`` uses its own generator
made from (seed, epoch, index, purpose), so the same run produces the same captions, flips and
crops whatever the worker count or order of loading, and switching one augmentation on or off
does not change the others.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path

import numpy as np


class Stream(IntEnum):
    """Separate random streams per purpose (values are part of the seed: never renumber)."""

    CAPTION = 1
    FLIP = 2
    CROP = 3
    SAMPLER = 4
    SPLIT = 5


def item_rng(seed: int, epoch: int, index: int, stream: Stream) -> np.random.Generator:
    """The generator for one augmentation of one item in one epoch."""
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, epoch, index, int(stream)])


def read_caption(image_path: Path, extension: str = ".txt", default: str = "") -> str:
    """Text of the same-name caption file (whitespace and line breaks collapsed), else ``default``."""
    caption_path = image_path.with_suffix(extension)
    if not caption_path.is_file():
        return default
    try:
        text = caption_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read caption file {caption_path}: {err}") from err
    return " ".join(text.split())


def shuffle_tags(caption: str, rng: np.random.Generator, *, keep_tokens: int = 0, separator: str = ",") -> str:
    """Shuffle the ``separator``-separated tags of ``caption``, keeping the first ``keep_tokens`` in place."""
    tags = [tag.strip() for tag in caption.split(separator) if tag.strip()]
    fixed, movable = tags[:keep_tokens], tags[keep_tokens:]
    order = rng.permutation(len(movable))
    return f"{separator} ".join(fixed + [movable[i] for i in order])


def process_caption(
    caption: str,
    rng: np.random.Generator,
    *,
    dropout: float = 0.0,
    shuffle: bool = False,
    keep_tokens: int = 0,
    separator: str = ",",
    prefix: str = "",
) -> str:
    """Caption dropout (probability → empty caption), then optional tag shuffling (kohya's order of checks);
    ``prefix`` (a concept's trigger / class words) goes before the shuffled tags and is dropped with them.

    Both draws always happen, so the shuffle of an item does not depend on the dropout setting.
    """
    dropped = rng.random() < dropout
    shuffled = shuffle_tags(caption, rng, keep_tokens=keep_tokens, separator=separator) if shuffle else caption
    return "" if dropped else with_prefix(prefix, shuffled)


def with_prefix(prefix: str, caption: str) -> str:
    """``prefix`` and ``caption`` joined by one space (either may be empty)."""
    return " ".join(part for part in (prefix.strip(), caption) if part)
