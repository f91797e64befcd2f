"""Show what tuneonce's optimizer will see of a model: residual depth, parameter roles, eps and decay.

``tuneonce-inspect`` or ``python scripts/inspect_model.py``:

    tuneonce-inspect sdxl --lora-rank 16
    tuneonce-inspect sdxl --lora-rank 16 --lora-type lokr
    tuneonce-inspect flux-dev --json
    tuneonce-inspect /path/to/diffusers/folder --depth unet=87
    tuneonce-inspect flux-dev --memory --config my_run.yaml     # predicted peak memory
    tuneonce-inspect flux-dev --memory --budget-gb 12           # pick settings that fit 12 GB

MODEL is a local diffusers folder (a whole pipeline or one component) or a built-in name; it is built on
the meta device from its config (no weights are read, nothing is downloaded).
"""
import argparse
import json
import sys
import warnings

from tuneonce.model.builtin import builtin_names
from tuneonce.model.inspect import (
    add_lora,
    format_report,
    inspect_components,
    parse_depth_argument,
    resolve_model,
    total_params,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneonce-inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=f"local diffusers folder or built-in name: {', '.join(builtin_names())}")
    parser.add_argument("--lora-rank", type=int, help="put a PEFT LoRA of this rank on the default targets")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    parser.add_argument("--lora-type", choices=("lora", "loha", "lokr"), default="lora",
                        help="adapter of --lora-rank: LoRA, or LyCORIS LoHa / LoKr (docs/lycoris_muon.md)")
    parser.add_argument("--lora-components", help="comma-separated components to adapt (default: the backbone)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr (table: spectral norm of an update)")
    parser.add_argument("--wd", type=float, default=0.1, help="weight decay, applied as wd/fan_in per step")
    parser.add_argument("--adam-eps", type=float, default=1e-8, help="eps of the auxiliary Adam on 1-D tensors")
    parser.add_argument("--adam-wd", type=float, default=0.0, help="weight decay of the auxiliary Adam")
    parser.add_argument("--depth", help="override: N for the backbone, or comp=N[,comp=N...]")
    parser.add_argument("--depth-source", choices=("model", "trained"), default="model")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    memory = parser.add_argument_group("memory plan (--memory)")
    memory.add_argument("--memory", action="store_true", help="predicted peak accelerator memory of a LoRA run")
    memory.add_argument("--config", help="training YAML whose resolution, batch, LoRA, optimizer and memory: it plans")
    memory.add_argument("--resolution", type=int, help="training resolution in px (default 1024 or the config's)")
    memory.add_argument("--batch", type=int, help="batch size (default 1 or the config's)")
    memory.add_argument("--budget-gb", type=float, help="pick quantization, checkpointing and offload to fit this")
    memory.add_argument("--resident-encoders", action="store_true",
                        help="without --config: the text encoders stay on the accelerator (caches off)")
    args = parser.parse_args(argv)
    if args.memory:
        return memory_main(args)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            components, pipeline = resolve_model(args.model)
            totals = total_params(components)
            if args.lora_rank is not None:
                names = args.lora_components.split(",") if args.lora_components else None
                add_lora(components, args.lora_rank, alpha=args.lora_alpha, names=names, kind=args.lora_type)
            report = inspect_components(
                components,
                pipeline=pipeline,
                weight_decay=args.wd,
                adam_eps=args.adam_eps,
                adam_weight_decay=args.adam_wd,
                depth_source=args.depth_source,
                depth_override=parse_depth_argument(args.depth),
            )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for warning in caught:  # depth guesses matter; library deprecation chatter does not
        if "depth" in str(warning.message):
            print(f"warning: {warning.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, lr=args.lr, total_params=totals))
    return 0


def memory_main(args: argparse.Namespace) -> int:
    from tuneonce.trainer.memory_plan import PlanSettings, backbone_name, memory_report, settings_from_config

    try:
        if args.budget_gb is not None and args.budget_gb <= 0:
            raise ValueError(f"--budget-gb: expected a positive number of GiB, got {args.budget_gb:g}")
        components, _ = resolve_model(args.model)
        components = {k: v for k, v in components.items() if k.startswith(("unet", "transformer", "text_encoder"))}
        budget = None
        if args.config:
            from tuneonce.config.loading import load_config
            from tuneonce.paths import resolve_config_path

            config = load_config(resolve_config_path(args.config))
            settings, budget = settings_from_config(config, backbone=backbone_name(components))
        else:  # a default config's run: both caches on, so the VAE and text encoders are parked after caching
            parked = [] if args.resident_encoders else ["vae", *(n for n in components if n.startswith("text_encoder"))]
            settings = PlanSettings(lora_rank=args.lora_rank or 16, parked=parked)
        if args.resolution:
            settings.resolution = args.resolution
        if args.batch:
            settings.batch = args.batch
        budget = args.budget_gb if args.budget_gb is not None else budget
        report = memory_report(components, settings, budget)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "text"}, indent=2))
    else:
        print(report["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
