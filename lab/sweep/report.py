"""From results.jsonl records to the sweep's outputs: per-cell statistics, best LRs, the Markdown table, the transfer
verdicts and the PNG plots (val loss vs LR, one panel per optimizer, one curve per axis value)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from lab.sweep.spec import SweepSpec

DIVERGED = math.inf  # a run whose validation loss is not finite ranks last


@dataclass(frozen=True)
class LrPoint:
    lr: float
    mean: float  # inf when any seed diverged
    std: float
    seeds: int
    by_seed: tuple[tuple[int, float], ...] = ()  # (seed, final val loss; inf when diverged)


@dataclass(frozen=True)
class Cell:
    """One (optimizer, model, rank) curve over the LR grid."""

    optimizer: str
    model: str
    rank: int
    points: tuple[LrPoint, ...]  # sorted by lr

    @property
    def best(self) -> LrPoint | None:
        finite = [p for p in self.points if math.isfinite(p.mean)]
        return min(finite, key=lambda p: p.mean) if finite else None

    def best_at_edge(self) -> bool:
        """The best LR is the smallest or largest LR that ran, so the true optimum may lie outside them."""
        best = self.best
        return best is not None and len(self.points) > 1 and best.lr in (self.points[0].lr, self.points[-1].lr)


def cells(records: list[dict]) -> dict[tuple[str, str, int], Cell]:
    """Group finished runs by (optimizer, model, rank) and LR; mean ± std over seeds."""
    losses: dict[tuple[str, str, int], dict[float, list[tuple[int, float]]]] = {}
    for r in records:
        if "error" in r:
            continue
        key = (r["optimizer"], r["model"], int(r["rank"]))
        value = r["val_loss"] if r["val_loss"] is not None else DIVERGED
        losses.setdefault(key, {}).setdefault(float(r["lr"]), []).append((int(r.get("seed", 0)), value))
    out = {}
    for key, by_lr in losses.items():
        points = []
        for lr in sorted(by_lr):
            values = [v for _, v in by_lr[lr]]
            if all(math.isfinite(v) for v in values):
                mean = statistics.fmean(values)
                std = statistics.stdev(values) if len(values) > 1 else 0.0
            else:
                mean, std = DIVERGED, 0.0
            points.append(LrPoint(lr, mean, std, len(values), tuple(sorted(by_lr[lr]))))
        out[key] = Cell(*key, points=tuple(points))
    return out


def axis_cells(spec: SweepSpec, table: dict[tuple[str, str, int], Cell], axis_name: str) -> dict[str, dict]:
    """optimizer -> {axis value: Cell} for the cells of one axis that have results."""
    axis = next(a for a in spec.axes if a.name == axis_name)
    out: dict[str, dict] = {}
    for optimizer in axis.optimizers:
        for value in axis.values:
            model = value if axis.varies == "model" else spec.base_model
            rank = int(value) if axis.varies == "rank" else spec.base_rank
            cell = table.get((optimizer, model, rank))
            if cell is not None:
                out.setdefault(optimizer, {})[value] = cell
    return out


@dataclass(frozen=True)
class OneLrCost:
    """Loss at the one LR a user keeps (chosen on the base point, or fixed) over the cell's own best, per seed."""

    lr: float  # the LR kept
    mean: float  # inf when the kept LR diverged in some seed
    std: float
    seeds: int


def reference_cell(spec: SweepSpec, axis) -> tuple[str, int]:
    """(model, rank) whose best LR is kept across `axis`: its own reference value, else the sweep's base point."""
    if axis is None or axis.reference is None:
        return spec.base_model, spec.base_rank
    if axis.varies == "model":
        return axis.reference, spec.base_rank
    return spec.base_model, int(axis.reference)


def kept_lr(spec: SweepSpec, table: dict[tuple[str, str, int], Cell], optimizer: str, axis=None) -> float | None:
    """The LR a user of `optimizer` keeps across `axis`: its fixed LR, or the best LR of the axis's reference
    (default: the base point)."""
    fixed = spec.optimizers[optimizer].fixed_lr
    if fixed is not None:
        return fixed
    base = table.get((optimizer, *reference_cell(spec, axis)))
    return base.best.lr if base is not None and base.best is not None else None


def one_lr_cost(cell: Cell, lr: float) -> OneLrCost | None:
    """Per seed: loss at `lr` / loss at the cell's best LR (best by the mean over seeds); mean ± std over seeds."""
    best = cell.best
    kept = next((p for p in cell.points if math.isclose(p.lr, lr, rel_tol=1e-9)), None)
    if best is None or kept is None:
        return None
    at_best = dict(best.by_seed)
    ratios = [v / at_best[s] for s, v in kept.by_seed if s in at_best]
    if not ratios:
        return None
    if not all(math.isfinite(r) for r in ratios):
        return OneLrCost(lr, DIVERGED, 0.0, len(ratios))
    return OneLrCost(lr, statistics.fmean(ratios), statistics.stdev(ratios) if len(ratios) > 1 else 0.0, len(ratios))


def grid_steps(lr_a: float, lr_b: float) -> int:
    """Distance of two LRs in factor-2 grid steps."""
    return round(abs(math.log2(lr_a / lr_b)))


def transfer_verdict(by_value: dict, complete: bool) -> str:
    """Does the best LR stay within one grid step across the axis values? (needs >= 2 values with a best LR)
    Flags a partial grid and best LRs at the grid's edge (where the true optimum may lie beyond it)."""
    bests = {v: c.best.lr for v, c in by_value.items() if c.best is not None}
    if len(bests) < 2:
        return "not measured"
    spread = grid_steps(max(bests.values()), min(bests.values()))
    verdict = "transfers (within 1 step)" if spread <= 1 else f"does not transfer ({spread} steps apart)"
    if any(c.best_at_edge() for c in by_value.values()):
        verdict += ", best at grid edge"
    return verdict if complete else verdict + ", partial"


def fmt_lr(lr: float) -> str:
    return f"{lr:.3g}"


def fmt_cost(mean: float | None, std: float | None = None) -> str:
    """A cost of one LR as the tables show it: 'not run', 'diverged', or the ratio (± its std over seeds)."""
    if mean is None:
        return "not run"
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def in_sweep(spec: SweepSpec, records: list[dict]) -> list[dict]:
    """The records of this sweep's runs (a results file may also hold runs of an earlier grid)."""
    ids = {p.run_id for p in spec.runs()}
    seen: set[str] = set()
    out = []
    for r in records:  # the first finished record of a run (two workers may both have run it)
        if r.get("id") in ids and "error" not in r and r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out


def markdown_report(spec: SweepSpec, records: list[dict]) -> str:
    """Per axis: a table of best LR and final val loss (mean ± std over seeds at the best LR) per optimizer × value,
    with each optimizer's transfer verdict; `*` marks a best LR at the edge of the grid."""
    records = in_sweep(spec, records)
    table = cells(records)
    lines = [f"Sweep `{spec.name}`: {len({r['id'] for r in records if 'error' not in r})} of {len(spec.runs())} runs "
             f"finished; {spec.steps} steps, seeds {list(spec.seeds)}, {spec.lr_points}-point factor-2 LR grid per "
             f"optimizer; base point {spec.base_model}, rank {spec.base_rank}.", ""]  # fmt: skip
    for axis in spec.axes:
        by_opt = axis_cells(spec, table, axis.name)
        header = " | ".join(str(v) for v in axis.values)
        lines += [f"### {axis.name} ({axis.varies})", "",
                  f"| optimizer | {header} | best LR transfer |", "|---" * (len(axis.values) + 2) + "|"]  # fmt: skip
        for optimizer in axis.optimizers:
            row = by_opt.get(optimizer, {})
            grid = spec.lr_grid(optimizer)
            entries = []
            for value in axis.values:
                cell = row.get(value)
                best = cell.best if cell else None
                if cell is None:
                    entries.append("not run")
                elif best is None:
                    entries.append("all diverged")
                else:
                    edge = "*" if cell.best_at_edge() else ""
                    partial = "" if len(cell.points) == len(grid) and best.seeds == len(spec.seeds) else " (partial)"
                    spread = f" ± {best.std:.4f}" if best.seeds > 1 else " (1 seed)"
                    entries.append(f"{fmt_lr(best.lr)}{edge}: {best.mean:.4f}{spread}{partial}")
            complete = all(v in row and len(row[v].points) == len(grid)
                           and all(p.seeds == len(spec.seeds) for p in row[v].points) for v in axis.values)
            lines.append(f"| {optimizer} | " + " | ".join(entries) + f" | {transfer_verdict(row, complete)} |")
        lines.append("")
        lines += cost_table(spec, table, axis)
        lines += versus_best_table(spec, table, axis)
        lines += step_off_table(spec, table, axis)
    lines.append("Entries: best LR: final validation loss mean ± std over seeds at that LR. `*`: the best LR is the "
                 "lowest or highest LR that ran (the optimum may lie beyond it); (partial): not every LR or seed ran. Transfer: best LRs of all values within one "
                 "factor-2 step.")  # fmt: skip
    return "\n".join(lines) + "\n"


def cost_table(spec: SweepSpec, table: dict[tuple[str, str, int], Cell], axis) -> list[str]:
    """Markdown rows: per optimizer the LR kept and, per axis value, the cost of keeping it (1.000 = that cell's best)."""
    header = " | ".join(str(v) for v in axis.values)
    lines = [f"Cost of one LR across {axis.name} (loss at the LR kept / the cell's best loss, per seed; mean ± std):", "",
             f"| optimizer | LR kept | {header} | worst |", "|---" * (len(axis.values) + 3) + "|"]  # fmt: skip
    cells_by_opt = axis_cells(spec, table, axis.name)
    for optimizer in axis.optimizers:
        lr = kept_lr(spec, table, optimizer, axis)
        reference = "base point" if axis.reference is None else str(axis.reference)
        how = "fixed" if spec.optimizers[optimizer].fixed_lr is not None else f"{reference}'s best"
        entries, worst = [], None
        for value in axis.values:
            cell = cells_by_opt.get(optimizer, {}).get(value)
            cost = one_lr_cost(cell, lr) if cell is not None and lr is not None else None
            if cost is None:
                entries.append("not run")
                continue
            entries.append(fmt_cost(cost.mean, cost.std))
            worst = cost.mean if worst is None else max(worst, cost.mean)
        kept = f"{fmt_lr(lr)} ({how})" if lr is not None else "not run"
        lines.append(f"| {optimizer} | {kept} | " + " | ".join(entries) + f" | {fmt_cost(worst)} |")
    return lines + [""]


def versus_best_table(spec: SweepSpec, table: dict[tuple[str, str, int], Cell], axis) -> list[str]:
    """Markdown rows: per optimizer and axis value, its mean loss at the LR it keeps over the lowest mean loss any
    optimizer of the axis reached in that cell (what a user loses by keeping this optimizer's one LR)."""
    by_opt = axis_cells(spec, table, axis.name)
    header = " | ".join(str(v) for v in axis.values)
    lines = [f"Loss at the LR kept over the best loss of any optimizer in the cell, across {axis.name}:", "",
             f"| optimizer | {header} | worst |", "|---" * (len(axis.values) + 2) + "|"]  # fmt: skip
    lowest = {v: min((c[v].best.mean for c in by_opt.values() if v in c and c[v].best), default=None)
              for v in axis.values}  # fmt: skip
    for optimizer in axis.optimizers:
        lr = kept_lr(spec, table, optimizer, axis)
        entries, worst = [], None
        for value in axis.values:
            cell = by_opt.get(optimizer, {}).get(value)
            kept = next((p for p in cell.points if lr and math.isclose(p.lr, lr, rel_tol=1e-9)), None) if cell else None
            if kept is None or lowest[value] is None:
                entries.append("not run")
                continue
            ratio = kept.mean / lowest[value]
            entries.append("diverged" if not math.isfinite(ratio) else f"{ratio:.3f}")
            worst = ratio if worst is None else max(worst, ratio)
        shown = "not run" if worst is None else ("diverged" if not math.isfinite(worst) else f"{worst:.3f}")
        lines.append(f"| {optimizer} | " + " | ".join(entries) + f" | {shown} |")
    return lines + [""]


def step_off_table(spec: SweepSpec, table: dict[tuple[str, str, int], Cell], axis) -> list[str]:
    """Markdown rows: per optimizer and axis value, the cost of one grid step below / above the cell's own best LR
    (how sharp the optimum is: a cost of one LR near 1.000 means little where one step off costs little too)."""
    by_opt = axis_cells(spec, table, axis.name)
    header = " | ".join(str(v) for v in axis.values)
    lines = [f"Cost of one step off the cell's best LR (×½ / ×2; '–': off the grid), across {axis.name}:", "",
             f"| optimizer | {header} |", "|---" * (len(axis.values) + 1) + "|"]  # fmt: skip

    def shown(cost: OneLrCost | None) -> str:
        return "–" if cost is None else ("diverged" if not math.isfinite(cost.mean) else f"{cost.mean:.3f}")

    for optimizer in axis.optimizers:
        entries = []
        for value in axis.values:
            cell = by_opt.get(optimizer, {}).get(value)
            best = cell.best if cell else None
            if best is None:
                entries.append("not run")
                continue
            entries.append(f"{shown(one_lr_cost(cell, best.lr / 2))} / {shown(one_lr_cost(cell, best.lr * 2))}")
        lines.append(f"| {optimizer} | " + " | ".join(entries) + " |")
    return lines + [""]


def plotted_curve(cell: Cell, relative: bool) -> list[tuple[float, float, float]]:
    """(lr, mean, std) of a cell's finite points; `relative` divides by the cell's best mean, so curves of models
    whose losses live on different scales (a pretrained UNet near 0.04, an untrained DiT near 1) share a panel."""
    best = cell.best
    scale = best.mean if relative and best is not None else 1.0
    return [(p.lr, p.mean / scale, p.std / scale) for p in cell.points if math.isfinite(p.mean)]


def plot_axis(spec: SweepSpec, records: list[dict], axis_name: str, path: Path) -> Path | None:
    """Val loss vs LR (log2 axis), one panel per optimizer, one curve (mean ± std over seeds) per axis value; losses
    above 1.5x a panel's lowest are cut off at its top (diverging LRs would flatten the basin). Axes that vary the
    model plot each curve relative to its own best (different models, different loss scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    by_opt = axis_cells(spec, cells(in_sweep(spec, records)), axis_name)
    if not by_opt:
        return None
    axis = next(a for a in spec.axes if a.name == axis_name)
    relative = axis.varies == "model"
    names = [o for o in axis.optimizers if o in by_opt]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, optimizer in zip(axes.flat, names):
        shown = []
        for value, cell in by_opt[optimizer].items():
            curve = plotted_curve(cell, relative)
            if curve:
                lrs, means, stds = zip(*curve)
                ax.errorbar(lrs, means, yerr=stds, marker="o", markersize=3, capsize=2, label=str(value))
                shown += means
        if shown and max(shown) > 1.5 * min(shown):  # keep the basin readable: blow-ups leave the top of the panel
            ax.set_ylim(0.98 * min(shown), 1.5 * min(shown))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({p.lr for c in by_opt[optimizer].values() for p in c.points}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:.2g}"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(optimizer, fontsize=9)
        ax.set_xlabel("learning rate", fontsize=8)
        ax.set_ylabel("final val loss / curve's best" if relative else "final val loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, title=axis_name, title_fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    scale = " (each curve relative to its best)" if relative else ""
    fig.suptitle(f"{spec.name}: validation loss vs LR across {axis_name}{scale}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(spec: SweepSpec, records: list[dict], out_dir: Path, *, plots: bool = True) -> list[Path]:
    """table.md and one lr_<axis>.png per axis with results, under out_dir; returns the files written."""
    written = [out_dir / "table.md"]
    written[0].write_text(markdown_report(spec, records), encoding="utf-8")
    if plots:
        for axis in spec.axes:
            png = plot_axis(spec, records, axis.name, out_dir / f"lr_{axis.name}.png")
            if png is not None:
                written.append(png)
    return written
