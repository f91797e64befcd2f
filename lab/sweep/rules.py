"""LR transfer rules evaluated on a finished sweep, without new runs: a rule says how the LR tuned on the base
point should change on another model (e.g. "multiply it by the ratio of the models' median spectral ratios");
its cost on a cell is the loss at the grid LR nearest to the rule's LR over the cell's best (per seed, as
report.one_lr_cost). The mechanism section of docs/lr_transfer.md uses it to test a formula against the
measured best LRs.

    python -m lab.sweep.rules --config sweeps/v2.yaml --out runs/sweep_v2 [--statistic spectral_ratio]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lab.sweep.report import Cell, cells, fmt_cost, in_sweep, one_lr_cost
from lab.sweep.runner import RESULTS_NAME, read_results
from lab.sweep.spec import load_sweep

STATISTICS = ("spectral_ratio", "gain", "sigma_in")


def model_factors(layer_stats: dict, statistic: str, reference: str) -> dict[str, float]:
    """Per model: its median `statistic` over the adapted layers divided by the reference model's."""
    base = layer_stats[reference]["summary"][statistic]
    return {name: entry["summary"][statistic] / base for name, entry in layer_stats.items()}


def nearest_grid_lr(cell: Cell, lr: float) -> float:
    """The LR of the cell's grid closest to `lr` in log scale (ties: the lower)."""
    return min((p.lr for p in cell.points), key=lambda x: (abs(math.log2(x / lr)), x))


def rule_rows(spec, records: list[dict], factors: dict[str, float], optimizers: list[str]) -> list[dict]:
    """For every model cell at the base rank: the measured best LR, the rule's LR (base best x factor, snapped to
    the grid) and the cost there, next to the cost of keeping the base LR unchanged."""
    table = cells(in_sweep(spec, records))
    rows = []
    for optimizer in optimizers:
        base = table.get((optimizer, spec.base_model, spec.base_rank))
        if base is None or base.best is None:
            continue
        for (opt, model, rank), cell in sorted(table.items()):
            if opt != optimizer or rank != spec.base_rank or model not in factors or cell.best is None:
                continue
            ruled = nearest_grid_lr(cell, base.best.lr * factors[model])
            kept = one_lr_cost(cell, base.best.lr)
            cost = one_lr_cost(cell, ruled)
            rows.append({"optimizer": optimizer, "model": model, "factor": factors[model], "best_lr": cell.best.lr,
                         "kept_lr": base.best.lr, "kept_cost": kept.mean if kept else None, "rule_lr": ruled,
                         "rule_cost": cost.mean if cost else None,
                         "log2_best_over_base": math.log2(cell.best.lr / base.best.lr)})  # fmt: skip
    return rows


def markdown(rows: list[dict], statistic: str) -> str:
    lines = [f"Rule: LR x (model's median {statistic} / base model's), nearest grid LR.", "",
             "| optimizer | model | factor | best LR | log2(best/base best) | cost, base LR kept | rule LR | cost, rule |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['model']} | {r['factor']:.2f} | {r['best_lr']:.3g} | "
                     f"{r['log2_best_over_base']:+.0f} | {fmt_cost(r['kept_cost'])} | {r['rule_lr']:.3g} | "
                     f"{fmt_cost(r['rule_cost'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.sweep.rules", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the sweep's output folder (results, layer_stats)")
    parser.add_argument("--statistic", choices=STATISTICS, default="spectral_ratio")
    parser.add_argument("--optimizers", nargs="+")
    args = parser.parse_args(argv)
    spec = load_sweep(args.config)
    stats = json.loads((args.out / "layer_stats.json").read_text(encoding="utf-8"))
    factors = model_factors(stats, args.statistic, spec.base_model)
    rows = rule_rows(spec, read_results(args.out / RESULTS_NAME), factors, args.optimizers or list(spec.optimizers))
    print(markdown(rows, args.statistic))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
