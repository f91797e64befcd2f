#!/usr/bin/env python
"""Compose the demo's before/after figure (docs/demo_samples.png) from a finished demo run.

    python scripts/train.py --config training_presets/demo_sdxl_lora.yaml
    python scripts/demo_figure.py --run output/demo_sdxl_lora --out docs/demo_samples.png

Columns: two training images of the concept, then each sampled step of the run (step 0 = the base model, from
sampling.at_start); each column holds one image per sample prompt (the preset's white- and black-background prompts).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw

TILE, PAD, LABEL = 128, 8, 18


def _tile(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST)


def compose(run: Path, concept: Path) -> Image.Image:
    samples = sorted((run / "samples").glob("step*_*.png"))
    if not samples:
        raise FileNotFoundError(f"{run / 'samples'}: no sample images (run the demo first)")
    steps: dict[int, list[Path]] = {}
    for path in samples:
        step, _ = map(int, re.match(r"step(\d+)_(\d+)", path.stem).groups())
        steps.setdefault(step, []).append(path)
    captions = {p: p.with_suffix(".txt").read_text() for p in sorted(concept.glob("*.png"))}
    training = [p for bg in ("white", "black") for p in [p for p, c in captions.items() if f"{bg} background" in c][:1]]
    if len(training) < 2:
        raise FileNotFoundError(f"{concept}: no training image on a white and one on a black background")
    columns = [("training image", training)] + [
        ("base (step 0)" if step == 0 else f"LoRA step {step}", paths) for step, paths in sorted(steps.items())
    ]
    rows = max(len(paths) for _, paths in columns)
    figure = Image.new("RGB", (len(columns) * (TILE + PAD) + PAD, LABEL + rows * (TILE + PAD) + PAD), "white")
    draw = ImageDraw.Draw(figure)
    for c, (label, paths) in enumerate(columns):
        x = PAD + c * (TILE + PAD)
        draw.text((x, 4), label, fill="black")
        for r, path in enumerate(paths):
            figure.paste(_tile(path), (x, LABEL + r * (TILE + PAD)))
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("output/demo_sdxl_lora"), help="the demo run's output folder")
    parser.add_argument("--concept", type=Path, default=Path("workspace/demo/concept"), help="the concept's images")
    parser.add_argument("--out", type=Path, default=Path("docs/demo_samples.png"))
    args = parser.parse_args(argv)
    try:
        figure = compose(args.run, args.concept)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
