"""Prepare the embedded demo's tiny SDXL base and concept datasets (train.py does this on demand too).

    python scripts/prepare_demo.py                  # from the shipped weights: a few seconds
    python scripts/prepare_demo.py --from-scratch   # pretrain + decoder step here (about 50 min on a busy 2-core CPU)
    python scripts/prepare_demo.py --write-asset    # the same, then refresh the shipped file from it
    python scripts/prepare_demo.py --decoder-only FOLDER
        # only the decoder step, on FOLDER (a base --from-scratch pretrained before the decoder step existed),
        # written into the shipped file; its other tensors stay byte for byte
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.demo.prepare import (
    ASSET_PATH, DecoderSettings, DemoSettings, decoder_hash, demo_paths, prepare_demo_base, save_asset, settings_hash,
    write_asset_decoder,
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="output folder (default: workspace/demo in the repo)")
    parser.add_argument("--from-scratch", action="store_true", help="pretrain instead of using the shipped weights")
    parser.add_argument("--write-asset", action="store_true", help=f"after pretraining, write {ASSET_PATH.name}")
    parser.add_argument("--decoder-only", type=Path, metavar="FOLDER",
                        help=f"run only the decoder step on this pretrained base and write it into {ASSET_PATH.name}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    settings, decoder = DemoSettings(), DecoderSettings()
    started = time.perf_counter()
    if args.decoder_only:
        try:
            path = write_asset_decoder(args.decoder_only, settings, decoder)
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"wrote {path} ({time.perf_counter() - started:.1f} s)")
        return 0
    base = prepare_demo_base(args.root, settings, from_scratch=args.from_scratch or args.write_asset, decoder=decoder)
    print(f"demo base: {base} ({time.perf_counter() - started:.1f} s)")
    paths = demo_paths(args.root)
    print(f"concept: {paths.concept}  validation: {paths.concept_val}")
    if args.write_asset:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(base)
        print(f"wrote {save_asset(pipe, settings_hash(settings), decoder_hash(settings, decoder))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
