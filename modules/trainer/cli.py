"""``tuneonce-train`` / ``python -m tuneonce.train`` / ``python scripts/train.py``: load and validate a config,
then train.

Config errors print one line and exit with code 2 before anything heavy (torch, diffusers) is
imported; ``--debug`` shows the traceback instead.

Exit codes: 0 trained (or --dry-run); 1 an unexpected error (a bug: its traceback is printed); 2 bad input, one line
naming the field, file or value, whether found before anything loads (config, output folders that are files /
unwritable / too full) or once models and data are opened (a missing model or data folder, an unreadable caption or
checkpoint, images too large to encode); 3 training diverged (``training.max_nonfinite_steps``
non-finite steps in a row; the last good checkpoint is kept, no final file is written); 130 stopped by Ctrl-C /
SIGTERM (a checkpoint and, with ``saving.save_on_stop``, the LoRA so far are written).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from tuneonce.config.loading import ConfigError, dump_config, load_config
from tuneonce.config.schema import TrainConfig, config_warnings
from tuneonce.paths import presets_dir, resolve_config_path

EXIT_CONFIG_ERROR = 2  # bad input, wherever it is found
EXIT_INTERRUPTED = 130
EXIT_DIVERGED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneonce-train",
        description="Train a LoRA or finetune a diffusion model from a YAML config (see configs/SCHEMA.md).",
    )
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="YAML config file, or the name of a shipped preset (e.g. demo_sdxl_lora)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override fields, e.g. --set optimizer.lr=2e-3 lora.rank=8 (values parsed as YAML; repeatable)",
    )
    parser.add_argument(
        "--resume",
        metavar="latest|DIR",
        help="continue from the newest loadable checkpoint of the run (latest) or from a checkpoint folder "
        "(same as --set resume=...)",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def summary(cfg: TrainConfig) -> str:
    """One line saying what this run will do."""
    opt = cfg.optimizer
    what = f"{cfg.model.family} {cfg.method}"
    if cfg.method == "lora":
        what += f" r{cfg.lora.rank} alpha {cfg.lora.effective_alpha:g}" + (" dora" if cfg.lora.dora else "")
    length = f"{cfg.schedule.max_steps} steps" if cfg.schedule.max_steps else f"{cfg.schedule.epochs} epochs"
    batch = f"batch {cfg.training.batch_size}x{cfg.training.gradient_accumulation}"
    return (
        f"tuneonce: {what} | {opt.type} lr {opt.lr:g} wd {opt.weight_decay:g} | {length}, {batch}, "
        f"{cfg.schedule.scheduler} | {cfg.model.base_model} -> {cfg.saving.output_dir}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = args.overrides + ([f"resume={args.resume}"] if args.resume else [])
        cfg = load_config(resolve_config_path(args.config), overrides)
    except ConfigError as e:
        if args.debug:
            traceback.print_exc()
        named = not Path(args.config).suffix and not resolve_config_path(args.config).exists()
        hint = f", nor a preset name ({presets_dir()})" if named else ""
        print(f"config error: {e}{hint}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    for warning in config_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    from tuneonce.trainer.preflight import InputError, check_outputs  # torch-free

    try:
        check_outputs(cfg)  # before any model loads (a dry run validates them too)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    print(summary(cfg), flush=True)

    # Imported here so that config errors never pay for torch/diffusers imports.
    from tuneonce.trainer.checkpoint import CheckpointError
    from tuneonce.trainer.train import run_training

    try:
        result = run_training(cfg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except InputError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (FileNotFoundError, NotADirectoryError, ValueError, CheckpointError) as e:
        # Bad input found once models and data are opened (missing folder, wrong family, empty dataset):
        # one line and the same exit code as config errors; --debug keeps the traceback for real bugs.
        if args.debug:
            raise
        print(f"error: {e} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
