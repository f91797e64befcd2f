"""Prepare the embedded demo's tiny SDXL bases and concept datasets (train.py does this on demand too).

Base v2 (workspace/demo/tiny_sdxl_base, the demo's) is base v1's VAE and text encoders with a UNet pretrained
longer on a domain with stars; base v1 (tiny_sdxl_base_v1, with --v1) is what the LR sweep ran on.

    python scripts/prepare_demo.py                  # from the shipped weights: a few seconds
    python scripts/prepare_demo.py --from-scratch   # v1 pretrain + decoder step + v2's UNet here (~1 h on 2 cores)
    python scripts/prepare_demo.py --write-asset    # the same, then refresh both shipped files from it
    python scripts/prepare_demo.py --unet-only      # only v2's UNet stage, on the shipped v1; writes its file
    python scripts/prepare_demo.py --flux           # the Flux demo base with its transformer pretrained here
        # (~11 min on one CPU thread), written into modules/demo/assets/tiny_flux_transformer.safetensors
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

from tuneonce.demo.prepare import (
    ASSET_PATH, UNET_ASSET_PATH, DecoderSettings, DemoSettings, UNetSettings, decoder_hash, demo_paths,
    prepare_demo_base, save_asset, save_unet_asset, settings_hash, unet_hash, write_asset_decoder,
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="output folder (default: workspace/demo in the repo)")
    parser.add_argument("--from-scratch", action="store_true", help="pretrain instead of using the shipped weights")
    parser.add_argument("--write-asset", action="store_true",
                        help=f"after pretraining, write {ASSET_PATH.name} and {UNET_ASSET_PATH.name}")
    parser.add_argument("--unet-only", action="store_true",
                        help=f"run only base v2's UNet stage on the shipped v1 and write {UNET_ASSET_PATH.name}")
    parser.add_argument("--v1", action="store_true", help="prepare base v1 (the LR sweep's) instead of v2")
    parser.add_argument("--decoder-only", type=Path, metavar="FOLDER",
                        help=f"run only the decoder step on this pretrained base and write it into {ASSET_PATH.name}")
    parser.add_argument("--flux", action="store_true",
                        help="pretrain the Flux demo's transformer on the v2 base (one thread, ~11 min) and write "
                             "modules/demo/assets/tiny_flux_transformer.safetensors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.flux:
        return write_flux_asset(args.root)

    settings, decoder, unet = DemoSettings(), DecoderSettings(), UNetSettings()
    started = time.perf_counter()
    if args.decoder_only:
        try:
            path = write_asset_decoder(args.decoder_only, settings, decoder)
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"wrote {path} ({time.perf_counter() - started:.1f} s)")
        return 0
    from diffusers import StableDiffusionXLPipeline

    def report(name: str, folder: Path) -> None:
        print(f"demo base {name}: {folder} ({time.perf_counter() - started:.1f} s)")

    if args.write_asset or args.v1:  # v1 on its own: its file holds v1's UNet, which v2 replaces
        v1 = prepare_demo_base(args.root, settings, from_scratch=args.from_scratch or args.write_asset,
                               decoder=decoder, unet=None)
        report("v1", v1)
        if args.write_asset:
            pipe = StableDiffusionXLPipeline.from_pretrained(v1)
            print(f"wrote {save_asset(pipe, settings_hash(settings), decoder_hash(settings, decoder))}")
    if not args.v1:
        retrain_unet = args.write_asset or args.unet_only or args.from_scratch  # None: not from the shipped file
        base = prepare_demo_base(args.root, settings, from_scratch=args.from_scratch and not args.write_asset,
                                 decoder=decoder, unet=unet, unet_asset_path=None if retrain_unet else UNET_ASSET_PATH)
        report("v2", base)
        if args.write_asset or args.unet_only:
            pipe = StableDiffusionXLPipeline.from_pretrained(base)
            print(f"wrote {save_unet_asset(pipe, unet_hash(settings, decoder, unet))}")
    paths = demo_paths(args.root)
    print(f"concept: {paths.concept}  validation: {paths.concept_val}")
    return 0


def write_flux_asset(root: Path | None) -> int:
    """(Re)build the Flux demo base with its transformer pretrained here, then write the shipped transformer."""
    import torch
    from diffusers import FluxTransformer2DModel

    from tuneonce.demo.flux import (
        TRANSFORMER_ASSET_PATH, FluxPretrainSettings, flux_transformer_hash, prepare_flux_demo_base,
        save_transformer_asset,
    )  # fmt: skip

    torch.set_num_threads(1)  # tiny models are op-overhead bound; and deterministic on every machine
    started = time.perf_counter()
    settings, recipe = DemoSettings(), FluxPretrainSettings()
    folder = prepare_flux_demo_base(root, settings, pretrain=recipe, asset_path=None)
    digest = flux_transformer_hash(decoder_hash(settings, DecoderSettings()), recipe, settings)
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    print(f"Flux demo base: {folder} ({time.perf_counter() - started:.1f} s)")
    print(f"wrote {save_transformer_asset(transformer, digest, TRANSFORMER_ASSET_PATH)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
