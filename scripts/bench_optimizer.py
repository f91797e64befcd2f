"""Time one optimizer step on the real LoRA (or full-slice) shapes of a backbone, ours against the peers.

    python scripts/bench_optimizer.py --model sdxl --rank 16
    python scripts/bench_optimizer.py --model flux-dev --rank 16 --json
    python scripts/bench_optimizer.py --model sdxl --full --device cuda

The backbone is built on the meta device from its published config; only tensors of the LoRA factor shapes
(PEFT, default attention + feed-forward + projection targets), or with --full those of a representative slice
of the backbone, are allocated. Optimizers: torch AdamW (foreach), torch.optim.Muon, adv_optm's Muon_adv and
AdaMuon_adv (used directly, when installed), and tuneonce's Muon_adv modes, AdaMuon_adv and LoRAMuon.
--json prints {"model", "rank", "results": {NAME: {median_ms, ratio_to_adamw, state_bytes, orthogonalized,
matrices}}, ...}; `orthogonalized` counts the tensors that really took an orthogonalized path.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lab.optimizer_bench import format_table, run_benchmark  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="built-in architecture name (sdxl, flux-dev, sd15, ...)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--full", action="store_true", help="full finetuning of a representative slice instead of LoRA")
    parser.add_argument("--slice", help="--full: comma-separated module-name prefixes (default: one stage / block)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer (median; default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--only", help="comma-separated optimizer names to run (AdamW always runs)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        report = run_benchmark(
            args.model, rank=None if args.full else args.rank, full=args.full, device=args.device, steps=args.steps,
            warmup=args.warmup, only=args.only.split(",") if args.only else None,
            slices=tuple(args.slice.split(",")) if args.slice else None,
        )  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
