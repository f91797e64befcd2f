"""Deterministic generated image datasets for the demo and the tests.

Each image is a coloured shape on a plain background, drawn with PIL and written as
``NNNN.png`` plus a same-name ``NNNN.txt`` caption. A :class:`Concept` fixes which shapes,
colours, textures and backgrounds can appear and how the caption reads. Two concepts ship:

- :data:`PRETRAIN_CONCEPT`: plain circles/squares/triangles in four colours; the tiny demo
  base model is "pretrained" on it so it knows the domain (base v2's UNet also sees plain stars and magenta).
- :data:`NEW_CONCEPT`: a magenta striped star captioned with the trigger word ``zxq``; the
  demo LoRA learns it. Stripes and the trigger never occur in pretraining.

Everything is a pure function of (concept, seed, count, size): the same call writes the same
bytes. :func:`caption_vocabulary` lists every word a caption can contain, so a tokenizer built
offline can cover them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "magenta": (210, 40, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
TEXTURES = ("plain", "stripes")
_SUPERSAMPLE = 2  # draw at 2x and downsample so edges are anti-aliased


@dataclass(frozen=True)
class Concept:
    """What a generated dataset shows; ``caption`` is a format string over shape/color/background."""

    name: str
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    backgrounds: tuple[str, ...]
    texture: str = "plain"
    caption: str = "a {color} {shape} on a {background} background"

    def __post_init__(self) -> None:
        for field, values, known in (
            ("shapes", self.shapes, SHAPES),
            ("colors", self.colors, tuple(COLORS)),
            ("backgrounds", self.backgrounds, tuple(BACKGROUNDS)),
        ):
            unknown = [v for v in values if v not in known]
            if not values or unknown:
                raise ValueError(f"Concept {self.name!r}: {field} must be a non-empty subset of {known}, got {values}")
        if self.texture not in TEXTURES:
            raise ValueError(f"Concept {self.name!r}: texture must be one of {TEXTURES}, got {self.texture!r}")


PRETRAIN_CONCEPT = Concept(
    name="pretrain",
    shapes=("circle", "square", "triangle"),
    colors=("red", "green", "blue", "yellow"),
    backgrounds=("white", "gray", "black"),
)
NEW_CONCEPT = Concept(
    name="zxq",
    shapes=("star",),
    colors=("magenta",),
    backgrounds=("white", "gray", "black"),
    texture="stripes",
    caption="a zxq {shape} on a {background} background",
)
TRIGGER_WORD = "zxq"


def caption_vocabulary(concepts: tuple[Concept, ...] = (PRETRAIN_CONCEPT, NEW_CONCEPT)) -> list[str]:
    """Every word that captions of ``concepts`` can contain, sorted."""
    words: set[str] = set()
    for concept in concepts:
        for shape in concept.shapes:
            for color in concept.colors:
                for background in concept.backgrounds:
                    words.update(_caption(concept, shape, color, background).split())
    return sorted(words)


def _caption(concept: Concept, shape: str, color: str, background: str) -> str:
    return concept.caption.format(shape=shape, color=color, background=background)


def _shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = 4
        radii = [radius] * corners
    elif shape == "triangle":
        corners = 3
        radii = [radius] * corners
    elif shape == "star":
        corners = 10
        radii = [radius if i % 2 == 0 else radius * 0.45 for i in range(corners)]
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    return [
        (cx + r * math.cos(angle + 2 * math.pi * i / corners), cy + r * math.sin(angle + 2 * math.pi * i / corners))
        for i, r in enumerate(radii)
    ]


def render_sample(concept: Concept, rng: np.random.Generator, size: tuple[int, int], *,
                  with_mask: bool = False) -> tuple[Image.Image, str] | tuple[Image.Image, str, Image.Image]:
    """Draw one image of ``concept`` (size = (width, height)) and return it with its caption (and, ``with_mask``,
    the shape's grayscale coverage mask, a loss mask for data.masked_loss)."""
    width, height = size
    shape = concept.shapes[int(rng.integers(len(concept.shapes)))]
    color = concept.colors[int(rng.integers(len(concept.colors)))]
    background = concept.backgrounds[int(rng.integers(len(concept.backgrounds)))]
    short = min(width, height)
    radius = short * float(rng.uniform(0.25, 0.38))
    cx = float(rng.uniform(radius, width - radius))
    cy = float(rng.uniform(radius, height - radius))
    angle = float(rng.uniform(0, 2 * math.pi)) if shape != "star" else -math.pi / 2 + float(rng.uniform(-0.3, 0.3))

    s = _SUPERSAMPLE
    big = (width * s, height * s)
    mask = Image.new("L", big, 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s], fill=255)
    else:
        draw.polygon([(x * s, y * s) for x, y in _shape_polygon(shape, cx, cy, radius, angle)], fill=255)

    fill = np.empty((big[1], big[0], 3), dtype=np.uint8)
    fill[:] = COLORS[color]
    if concept.texture == "stripes":  # horizontal bands, at least 2 output pixels each, on the supersample grid
        band = s * max(2, short // 16)
        dark = (np.arange(big[1]) // band) % 2 == 1
        fill[dark] = [c // 3 for c in COLORS[color]]
    image = Image.new("RGB", big, BACKGROUNDS[background])
    image.paste(Image.fromarray(fill), (0, 0), mask)
    image = image.resize((width, height), Image.Resampling.BOX)  # area average: anti-aliased, no ringing
    if with_mask:
        return image, _caption(concept, shape, color, background), mask.resize((width, height), Image.Resampling.BOX)
    return image, _caption(concept, shape, color, background)


def write_dataset(
    out_dir: str | Path,
    concept: Concept,
    *,
    count: int,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    caption_extension: str = ".txt",
    masks: bool = False,
) -> list[Path]:
    """Write ``count`` png + caption pairs of ``concept`` into ``out_dir`` and return the image paths.

    ``size`` is a side length or (width, height). Files are named ``0000.png``, ``0001.png``, ...;
    existing files with those names are overwritten, other files are left alone. ``masks``: also the shape's
    ``0000-masklabel.png`` (OneTrainer's loss-mask naming; the images are the same with or without).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    width, height = (size, size) if isinstance(size, int) else size
    if width < 8 or height < 8:
        raise ValueError(f"size must be at least 8x8 pixels, got {width}x{height}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        # one stream per image: image i is the same whatever ``count`` is
        rng = np.random.default_rng([seed & 0xFFFFFFFF, i])
        image, caption, mask = render_sample(concept, rng, (width, height), with_mask=True)
        path = out / f"{i:04d}.png"
        image.save(path, format="PNG")
        if masks:
            mask.save(out / f"{i:04d}-masklabel.png", format="PNG")
        path.with_suffix(caption_extension).write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def write_pretrain_dataset(
    out_dir: str | Path, *, count: int = 64, size: int | tuple[int, int] = 64, seed: int = 0
) -> list[Path]:
    """The demo base model's pretraining set (:data:`PRETRAIN_CONCEPT`)."""
    return write_dataset(out_dir, PRETRAIN_CONCEPT, count=count, size=size, seed=seed)


def write_concept_dataset(
    out_dir: str | Path, *, count: int = 16, size: int | tuple[int, int] = 64, seed: int = 1, masks: bool = False
) -> list[Path]:
    """The new concept the demo LoRA learns (:data:`NEW_CONCEPT`, trigger word ``zxq``); ``masks``: with the stars'
    loss masks."""
    return write_dataset(out_dir, NEW_CONCEPT, count=count, size=size, seed=seed, masks=masks)
