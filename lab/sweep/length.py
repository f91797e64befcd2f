"""Does the best LR found at one run length hold at a longer one? From finished results of the same cells at two
lengths (the `steps` field of each record): per (optimizer, model, rank) the best LR at each length, the grid steps
between them, the cost at the long length of keeping the short length's best LR (loss / the long cell's best, per
seed, as report.one_lr_cost) and the CPU seconds each length took. docs/lr_transfer.md's length check uses it.

    python -m lab.sweep.length runs/len_flux200/results.jsonl runs/len_flux400/results.jsonl [--short 200 --long 400]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lab.sweep.report import cells, fmt_cost, fmt_lr, grid_steps, one_lr_cost
from lab.sweep.runner import read_results


def length_rows(records: list[dict], short: int, long: int) -> list[dict]:
    """One row per cell that ran at both lengths."""
    by_length = {n: [r for r in records if int(r.get("steps", 0)) == n] for n in (short, long)}
    table_short, table_long = cells(by_length[short]), cells(by_length[long])
    seconds = {n: {} for n in (short, long)}
    for n, records_n in by_length.items():
        for r in records_n:
            key = (r["optimizer"], r["model"], int(r["rank"]))
            seconds[n][key] = seconds[n].get(key, 0.0) + float(r.get("seconds", 0.0))
    rows = []
    for key in sorted(set(table_short) & set(table_long)):
        cell_short, cell_long = table_short[key], table_long[key]
        if cell_short.best is None or cell_long.best is None:
            continue
        cost = one_lr_cost(cell_long, cell_short.best.lr)
        rows.append({
            "optimizer": key[0], "model": key[1], "rank": key[2],
            "best_short": cell_short.best.lr, "best_long": cell_long.best.lr,
            "steps_apart": grid_steps(cell_short.best.lr, cell_long.best.lr),
            "edge": cell_short.best_at_edge() or cell_long.best_at_edge(),
            "cost": None if cost is None else cost.mean, "cost_std": None if cost is None else cost.std,
            "seeds": min(p.seeds for p in cell_long.points),
            "seconds_short": seconds[short][key], "seconds_long": seconds[long][key],
        })  # fmt: skip
    return rows


def markdown(rows: list[dict], short: int, long: int) -> str:
    lines = [
        f"| optimizer | model | rank | best LR at {short} steps | at {long} | steps apart | cost at {long} of the "
        f"{short}-step LR | seeds | CPU s ({short} / {long}) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        edge = " (grid edge)" if r["edge"] else ""
        lines.append(f"| {r['optimizer']} | {r['model']} | {r['rank']} | {fmt_lr(r['best_short'])} | "
                     f"{fmt_lr(r['best_long'])} | {r['steps_apart']}{edge} | {fmt_cost(r['cost'], r['cost_std'])} | {r['seeds']} | "
                     f"{r['seconds_short']:.0f} / {r['seconds_long']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.sweep.length", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.jsonl files (any mix of lengths)")
    parser.add_argument("--short", type=int, default=200, help="the sweep's length (steps)")
    parser.add_argument("--long", type=int, default=400, help="the check's length (steps)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.exit(2, f"error: results file not found: {', '.join(missing)}\n")
    records = [r for path in args.results for r in read_results(path)]
    print(markdown(length_rows(records, args.short, args.long), args.short, args.long), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
