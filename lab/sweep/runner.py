"""Run a sweep in-process: one short LoRA finetune per RunPlan through the training loop, each result appended to
results.jsonl as soon as it ends (runs already in the file are skipped, so an interrupted sweep resumes)."""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.sweep.models import prepare_data, prepare_model
from lab.sweep.spec import RunPlan, SweepSpec, override_strings

RESULTS_NAME = "results.jsonl"


def read_results(path: Path) -> list[dict]:
    """Records of results.jsonl (a torn last line from an interrupted write is ignored)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def run_config(spec: SweepSpec, plan: RunPlan, base_model: Path, data: tuple[Path, Path], run_dir: Path) -> Any:
    """The validated TrainConfig of one run: base preset, sweep overrides, optimizer variant, then the run's own."""
    from tuneonce.config import load_config

    model = spec.models[plan.model]
    own = {
        "model.family": model.family, "model.base_model": str(base_model),
        "lora.rank": plan.rank, "training.seed": plan.seed, "schedule.max_steps": plan.steps,
        "data.folders": [{"path": str(data[0])}], "validation.folder": str(data[1]),
        "data.cache_dir": str(run_dir.parent.parent / "cache"), "saving.output_dir": str(run_dir),
        spec.optimizers[plan.optimizer].grid_key: plan.lr,  # the grid's value (the LR, or e.g. Prodigy's d_coef)
    }  # fmt: skip
    layers = {**spec.overrides, **spec.optimizers[plan.optimizer].overrides, **own}
    return load_config(spec.base_config, override_strings(layers))


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_one(spec: SweepSpec, plan: RunPlan, base_model: Path, data: tuple[Path, Path], out_dir: Path) -> dict:
    """Train one run and return its record (final validation loss and curve; None where not finite)."""
    from tuneonce.trainer.train import train

    run_dir = out_dir / "runs" / plan.folder_name
    config = run_config(spec, plan, base_model, data, run_dir)
    started = time.perf_counter()
    try:
        result = train(config, show_progress=False)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # LoRA files and logs of a sweep run are not kept
    if result.interrupted:  # Ctrl-C / SIGTERM: the run is not finished, so it must not enter results.jsonl
        raise KeyboardInterrupt(f"{plan.run_id} stopped at step {result.steps}")
    curve = [[step, _finite(loss)] for step, loss in result.val_losses]
    final = curve[-1][1] if curve else None
    return {
        "id": plan.run_id, "optimizer": plan.optimizer, "model": plan.model, "rank": plan.rank, "lr": plan.lr,
        "seed": plan.seed, "steps": plan.steps, "val_loss": final, "val_loss_start": curve[0][1] if curve else None,
        "val_curve": curve, "train_loss": _finite(result.final_loss), "diverged": final is None,
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip


def run_sweep(spec: SweepSpec, out_dir: Path, *, limit: int | None = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Run every plan not yet in results.jsonl (at most `limit` of them); returns all records of the file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_NAME
    done = {r["id"] for r in read_results(results_path) if "error" not in r}
    todo = [p for p in spec.runs() if p.run_id not in done]
    total = len(spec.runs())
    log(f"sweep {spec.name}: {total} runs, {total - len(todo)} already in {results_path}, {len(todo)} to run")
    if limit is not None:
        todo = todo[:limit]
    data = prepare_data(out_dir / "data", spec.train_images, spec.val_images)
    models: dict[str, Path] = {}
    started = time.perf_counter()
    for i, plan in enumerate(todo, 1):
        if plan.model not in models:
            log(f"preparing model {plan.model} ...")
            models[plan.model] = prepare_model(spec.models[plan.model], out_dir / "models")
        try:
            record = run_one(spec, plan, models[plan.model], data, out_dir)
        except KeyboardInterrupt as e:
            log(f"stopped: {e}; rerun the same command to go on")
            break
        except Exception as e:  # recorded and retried on the next invocation; the sweep goes on
            record = {"id": plan.run_id, "error": f"{type(e).__name__}: {e}"}
        with results_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        elapsed = time.perf_counter() - started
        eta = elapsed / i * (len(todo) - i)
        outcome = record.get("error") or f"val {record['val_loss']}"
        log(f"[{i}/{len(todo)}] {plan.run_id}: {outcome} ({record.get('seconds', 0)}s; eta {eta / 60:.1f} min)")
    return read_results(results_path)
