"""LR sweep: short LoRA finetunes over a factor-2 LR grid per optimizer x rank x model (see sweeps/*.yaml).

``python scripts/sweep_lr.py`` from a checkout (lab code: not in the wheel, no console script):

    python scripts/sweep_lr.py --config sweeps/default.yaml --out runs/sweep_default
    python scripts/sweep_lr.py --quick --out /tmp/sweep_quick      # sweeps/quick.yaml, the toy end-to-end check
    python scripts/sweep_lr.py --config sweeps/default.yaml --out runs/sweep_default --report-only

Writes <out>/results.jsonl (one line per run; rerunning skips runs already there), <out>/table.md and
<out>/lr_<axis>.png. Needs matplotlib for the plots (pip install -e ".[sweep]"; --no-plot skips them).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"  # the checkout's sweeps/ (the lab runs from a checkout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sweep_lr.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="sweep file (default: sweeps/default.yaml, or quick.yaml with --quick)")
    parser.add_argument("--quick", action="store_true", help="run sweeps/quick.yaml (toy size, for tests)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (results.jsonl, table.md, PNGs)")
    parser.add_argument("--limit", type=int, help="run at most this many of the remaining runs, then report")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: tiny models run fastest single-threaded on a shared CPU)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these seeds of the sweep")
    parser.add_argument("--optimizers", nargs="+", help="run only these optimizer variants")
    parser.add_argument("--axes", nargs="+", help="run only these axes")
    parser.add_argument("--models", nargs="+", help="run only these models (rank axes: only with the base model)")
    parser.add_argument("--steps", type=int,
                        help="train this many steps instead of the file's (e.g. 2x, to check a best LR holds at length)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite table and plots from results.jsonl")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--probe", action="store_true",
                        help="only write <out>/layer_stats.json: per model the adapted layers' input RMS, gain and "
                             "spectral ratio (lab/sweep/probe.py; builds models that are not built yet)")
    args = parser.parse_args(argv)

    from lab.sweep.report import write_outputs
    from lab.sweep.runner import RESULTS_NAME, read_results, run_sweep
    from lab.sweep.spec import SweepError, load_sweep, restrict

    path = args.config or SWEEPS / ("quick.yaml" if args.quick else "default.yaml")
    try:
        full = load_sweep(path)
        if args.steps is not None:
            if args.steps < 1:
                raise SweepError(f"--steps: must be >= 1, got {args.steps}")
            full = dataclasses.replace(full, steps=args.steps)
        spec = restrict(full, seeds=args.seeds, optimizers=args.optimizers, axes=args.axes,
                        models=args.models)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.probe:
        from lab.sweep.probe import write_layer_statistics

        print(f"wrote {write_layer_statistics(spec, args.out)}")
        return 0
    if args.report_only:
        records = read_results(args.out / RESULTS_NAME)
    else:
        import torch

        torch.set_num_threads(args.threads)
        records = run_sweep(spec, args.out, limit=args.limit)
    for written in write_outputs(full, records, args.out, plots=not args.no_plot):
        print(f"wrote {written}")
    print((args.out / "table.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
