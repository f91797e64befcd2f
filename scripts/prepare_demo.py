"""Prepare the embedded demo's tiny SDXL base and concept datasets (train.py does this on demand too).

    python scripts/prepare_demo.py                  # from the shipped weights: a few seconds
    python scripts/prepare_demo.py --from-scratch   # pretrain here (minutes); --write-asset refreshes the shipped file
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.demo.prepare import ASSET_PATH, DemoSettings, demo_paths, prepare_demo_base, save_asset, settings_hash


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="output folder (default: workspace/demo in the repo)")
    parser.add_argument("--from-scratch", action="store_true", help="pretrain instead of using the shipped weights")
    parser.add_argument("--write-asset", action="store_true", help=f"after pretraining, write {ASSET_PATH.name}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    settings = DemoSettings()
    started = time.perf_counter()
    base = prepare_demo_base(args.root, settings, from_scratch=args.from_scratch or args.write_asset)
    print(f"demo base: {base} ({time.perf_counter() - started:.1f} s)")
    paths = demo_paths(args.root)
    print(f"concept: {paths.concept}  validation: {paths.concept_val}")
    if args.write_asset:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(base)
        print(f"wrote {save_asset(pipe, settings_hash(settings))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
