"""LR sweep: the --quick sweep end to end on tiny real pipelines (results, resume, table, plots), the statistics and
verdicts against values computed here, grid expansion, model variants and one-line sweep-file errors."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from lab.sweep.report import cells, kept_lr, markdown_report, one_lr_cost, plotted_curve, transfer_verdict
from lab.sweep.runner import RESULTS_NAME, read_results, run_sweep
from lab.sweep.spec import SweepError, load_sweep, restrict

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "sweeps" / "quick.yaml"
DEFAULT = REPO / "sweeps" / "default.yaml"


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory) -> Path:
    from scripts.sweep_lr import main

    out = tmp_path_factory.mktemp("sweep_quick")
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--out", str(out)]) == 0  # runs single-threaded (--threads 1)
    finally:
        torch.set_num_threads(threads)
    return out


def test_quick_sweep_writes_one_finite_record_per_run(quick_out: Path) -> None:
    spec = load_sweep(QUICK)
    records = read_results(quick_out / RESULTS_NAME)
    assert sorted(r["id"] for r in records) == sorted(p.run_id for p in spec.runs())
    assert all("error" not in r for r in records), [r.get("error") for r in records]
    for r in records:
        steps = [step for step, _ in r["val_curve"]]
        assert steps[0] == 0 and steps[-1] == spec.steps
        assert r["val_loss"] == r["val_curve"][-1][1] and math.isfinite(r["val_loss"])
    # Fixed validation (held-out images, timesteps, noise) and LoRA B = 0 at step 0: every run on the same base
    # model starts from the same validation loss, whatever its optimizer, LR or rank.
    for model in ("unet_w64", "unet_w128"):
        starts = {r["val_loss_start"] for r in records if r["model"] == model}
        assert len(starts) == 1, (model, starts)
    assert {r["model"] for r in records} == {"unet_w64", "unet_w128"}
    # Training moved the model: some run ends away from its start.
    assert any(abs(r["val_loss"] - r["val_loss_start"]) > 1e-6 for r in records)


def test_quick_sweep_table_and_plots(quick_out: Path) -> None:
    from PIL import Image

    table = (quick_out / "table.md").read_text()
    records = read_results(quick_out / RESULTS_NAME)
    best = min((r for r in records if r["optimizer"] == "adamw" and r["rank"] == 2), key=lambda r: r["val_loss"])
    assert f"{best['lr']:.3g}" in table.split("| adamw |")[1].split("\n")[0]
    assert "### rank" in table and "### width" in table and "| muon_tuned |" in table and "| prodigy |" in table
    for name in ("lr_rank.png", "lr_width.png"):
        with Image.open(quick_out / name) as image:
            assert image.size[0] > 200 and image.size[1] > 200


def test_quick_sweep_resumes(quick_out: Path) -> None:
    path = quick_out / RESULTS_NAME
    lines = path.read_text().splitlines()
    spec = load_sweep(QUICK)
    run_sweep(spec, quick_out, log=lambda _: None)  # everything done: nothing runs, nothing is appended
    assert path.read_text().splitlines() == lines
    dropped = json.loads(lines[-1])
    path.write_text("\n".join(lines[:-1]) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the first run
    try:
        records = run_sweep(spec, quick_out, log=lambda _: None)  # exactly the missing run again
    finally:
        torch.set_num_threads(threads)
    assert [r["id"] for r in records] == [json.loads(line)["id"] for line in lines]
    assert records[-1]["val_loss"] == pytest.approx(dropped["val_loss"], rel=1e-5)  # deterministic rerun


def _record(optimizer: str, rank: int, lr: float, seed: int, loss: float | None) -> dict:
    return {"id": f"{optimizer}{rank}{lr}{seed}", "optimizer": optimizer, "model": "unet_w64", "rank": rank,
            "lr": lr, "seed": seed, "val_loss": loss}  # fmt: skip


def test_cells_best_lr_mean_std_and_divergence() -> None:
    losses = {1e-3: [0.50, 0.52, 0.54], 2e-3: [0.40, 0.46, 0.43], 4e-3: [0.30, None, 0.31]}
    records = [_record("a", 8, lr, s, v) for lr, vs in losses.items() for s, v in enumerate(vs)]
    cell = cells(records)[("a", "unet_w64", 8)]
    assert [p.lr for p in cell.points] == [1e-3, 2e-3, 4e-3]
    assert cell.best.lr == 2e-3  # 4e-3 has a diverged seed: it ranks last despite lower finite losses
    assert cell.best.mean == pytest.approx(statistics.fmean([0.40, 0.46, 0.43]))
    assert cell.best.std == pytest.approx(statistics.stdev([0.40, 0.46, 0.43]))
    assert math.isinf(cell.points[2].mean)
    assert not cell.best_at_edge()
    assert cells(records[:6])[("a", "unet_w64", 8)].best_at_edge()  # only 1e-3 and 2e-3 ran: 2e-3 is the top


def test_plotted_curve_relative_to_its_best_drops_diverged_points() -> None:
    losses = {1e-3: [1.2, 1.0], 2e-3: [0.8, 0.8], 4e-3: [0.9, None]}  # a DiT-scale curve; 4e-3 diverged once
    records = [_record("a", 8, lr, s, v) for lr, vs in losses.items() for s, v in enumerate(vs)]
    cell = cells(records)[("a", "unet_w64", 8)]
    spread = statistics.stdev([1.2, 1.0])
    assert plotted_curve(cell, relative=False) == [(1e-3, pytest.approx(1.1), pytest.approx(spread)),
                                                   (2e-3, pytest.approx(0.8), 0.0)]  # fmt: skip
    lrs, means, stds = zip(*plotted_curve(cell, relative=True))
    assert lrs == (1e-3, 2e-3)
    assert means == pytest.approx((1.1 / 0.8, 1.0))
    assert stds[0] == pytest.approx(statistics.stdev([1.2, 1.0]) / 0.8)


def test_transfer_verdict_counts_grid_steps() -> None:
    def by_rank(best: dict[int, float]) -> dict:
        records = [_record("a", rank, lr, 0, 0.1 if lr == b else 0.2) for rank, b in best.items()
                   for lr in (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)]  # fmt: skip
        table = cells(records)
        return {rank: table[("a", "unet_w64", rank)] for rank in best}

    assert transfer_verdict(by_rank({2: 2e-3, 8: 4e-3, 32: 4e-3}), True) == "transfers (within 1 step)"
    assert transfer_verdict(by_rank({2: 2e-3, 8: 4e-3, 32: 1.6e-2}), True) == "does not transfer (3 steps apart)"
    assert transfer_verdict(by_rank({2: 2e-3}), True) == "not measured"
    assert transfer_verdict(by_rank({2: 2e-3, 8: 4e-3}), False) == "transfers (within 1 step), partial"
    assert transfer_verdict(by_rank({2: 1.6e-2, 8: 3.2e-2}), True) == "transfers (within 1 step), best at grid edge"


def test_cost_of_one_lr_is_per_seed_loss_at_the_kept_lr_over_the_cells_best() -> None:
    """Kept LR 2e-3 (the base cell's best); in a cell whose best is 4e-3 the cost per seed is loss(2e-3)/loss(4e-3)."""
    other = {2e-3: [0.60, 0.66], 4e-3: [0.50, 0.60], 8e-3: [0.70, None]}
    records = [{**_record("a", 32, lr, s, v), "model": "unet_w64"} for lr, vs in other.items() for s, v in enumerate(vs)]
    cell = cells(records)[("a", "unet_w64", 32)]
    cost = one_lr_cost(cell, 2e-3)
    ratios = [0.60 / 0.50, 0.66 / 0.60]
    assert cost.lr == 2e-3 and cost.seeds == 2
    assert cost.mean == pytest.approx(statistics.fmean(ratios)) and cost.std == pytest.approx(statistics.stdev(ratios))
    assert one_lr_cost(cell, 4e-3).mean == pytest.approx(1.0)  # at the cell's own best: no cost
    assert math.isinf(one_lr_cost(cell, 8e-3).mean)  # the kept LR diverged in a seed
    assert one_lr_cost(cell, 1.6e-2) is None  # not on this cell's grid


def test_step_off_table_shows_the_cost_one_step_either_side_of_the_cells_best() -> None:
    """Best 2e-3 (mean over 2 seeds); one step below costs loss(1e-3)/loss(2e-3) per seed, one step above diverged."""
    from lab.sweep.report import step_off_table

    spec = load_sweep(DEFAULT)
    losses = {1e-3: (0.30, 0.33), 2e-3: (0.20, 0.22), 4e-3: (None, 0.5)}
    records = [{**_record("adamw", spec.base_rank, lr, seed, loss), "model": spec.base_model}
               for lr, pair in losses.items() for seed, loss in enumerate(pair)]  # fmt: skip
    rank_axis = next(a for a in spec.axes if a.varies == "rank")
    rows = step_off_table(spec, cells(records), rank_axis)
    below = statistics.fmean([0.30 / 0.20, 0.33 / 0.22])
    row = next(line for line in rows if line.startswith("| adamw |"))
    assert f"{below:.3f} / diverged" in row.split("|")[1 + 1 + rank_axis.values.index(spec.base_rank)]


def test_kept_lr_is_the_base_points_best_or_the_fixed_one() -> None:
    spec = load_sweep(DEFAULT)
    base = [_record("adamw", spec.base_rank, lr, 0, loss) for lr, loss in ((1e-3, 0.3), (2e-3, 0.2), (4e-3, 0.25))]
    table = cells([{**r, "model": spec.base_model} for r in base])
    assert kept_lr(spec, table, "adamw") == 2e-3
    assert kept_lr(spec, table, "prodigy") == 1.0  # fixed: never tuned, whatever the base point says
    assert kept_lr(spec, table, "muon_tuned") is None  # no base-point runs yet


def test_default_sweep_grid_and_restriction() -> None:
    spec = load_sweep(DEFAULT)
    assert len(spec.seeds) >= 3
    grid = spec.lr_grid("adamw")
    assert all(b / a == pytest.approx(2.0) for a, b in zip(grid, grid[1:]))
    n_lr, n_seed = spec.lr_points, len(spec.seeds)
    rank_axis = 10 * 3 * n_lr * n_seed  # every optimizer at ranks 2, 8, 32
    # width, depth: 4 optimizers x 1 new model, family: x 2 (pretrained and untrained DiT); w64 rank 8 is shared
    model_axes = 4 * 4 * n_lr * n_seed
    assert len(spec.runs()) == len({p.run_id for p in spec.runs()}) == rank_axis + model_axes
    part = restrict(spec, seeds=[0], axes=["rank"], optimizers=["adamw"])
    assert len(part.runs()) == 3 * n_lr and {p.run_id for p in part.runs()} <= {p.run_id for p in spec.runs()}
    text = markdown_report(spec, [])
    best_tables = 10 * 3 + 4 * (2 + 2 + 3)  # one entry per optimizer x axis value
    # and the LR kept and the worst per row; prodigy's kept LR is fixed (1.0), so it shows before any run (4 axes)
    cost_tables = 10 * (3 + 2) + 4 * ((2 + 2) + (2 + 2) + (3 + 2)) - 4
    versus_best = 10 * (3 + 1) + 4 * ((2 + 1) + (2 + 1) + (3 + 1))  # entries + worst, loss over the best optimizer
    step_off = best_tables  # one entry per optimizer x axis value, cost one grid step off its best
    assert text.count("not run") == best_tables + cost_tables + versus_best + step_off


def test_width_and_depth_variants_are_real_scaled_unets() -> None:
    from lab.sweep.models import build_tiny_sdxl_variant
    from lab.sweep.spec import ModelSpec

    base = build_tiny_sdxl_variant(ModelSpec("b", "sdxl", "tiny_sdxl")).unet
    wide = build_tiny_sdxl_variant(ModelSpec("w", "sdxl", "tiny_sdxl", width_multiplier=2)).unet
    deep = build_tiny_sdxl_variant(ModelSpec("d", "sdxl", "tiny_sdxl", depth_multiplier=2)).unet
    assert max(base.config.block_out_channels) == 64 and max(wide.config.block_out_channels) == 128

    def count(unet, kind: str) -> int:
        return sum(type(m).__name__ == kind for m in unet.modules())

    for kind in ("ResnetBlock2D", "BasicTransformerBlock"):
        # down stages double; up stages have layers_per_block + 1 resnets, so they go from 2 to 3 per stage
        assert count(deep, kind) > 1.4 * count(base, kind), kind
    assert count(wide, "ResnetBlock2D") == count(base, "ResnetBlock2D")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"axes": {"rank": {"varies": "rank", "values": [2], "optimizers": ["nope"]}}}, "axes.rank.optimizers: 'nope'"),
        ({"base_point": {"model": "missing", "rank": 8}}, "base_point.model: 'missing'"),
        ({"base_config": "no_such.yaml"}, "base_config"),
        ({"axes": {"rank": {"varies": "rank", "values": [0]}}}, "ranks must be positive"),
        ({"optimizers": {"p": {"lr_center": 1.0, "fixed_lr": 3.0}}, "axes": {"rank": {"varies": "rank", "values": [2]}}},
         "optimizers.p.fixed_lr: 3.0 is not on its LR grid"),
    ],
)
def test_bad_sweep_files_fail_with_one_line(tmp_path: Path, edit: dict, message: str) -> None:
    import yaml

    data = yaml.safe_load(QUICK.read_text())
    data["base_config"] = str(REPO / "training_presets" / "demo_sdxl_lora.yaml")
    data.update(edit)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    assert message in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)


V2 = REPO / "sweeps" / "v2.yaml"


def test_v2_prodigy_grid_varies_d_coef_at_lr_1_and_axes_keep_their_reference(tmp_path: Path) -> None:
    from lab.sweep.runner import run_config
    from lab.sweep.spec import RunPlan

    spec = load_sweep(V2)
    assert spec.lr_grid("prodigy") == [0.5, 1.0, 2.0, 4.0]  # its own 4 points, not the sweep's 6
    assert len(spec.lr_grid("adamw")) == spec.lr_points == 6
    plan = RunPlan("prodigy", spec.base_model, 8, 2.0, 0, spec.steps)
    config = run_config(spec, plan, Path("base"), (tmp_path / "a", tmp_path / "b"), tmp_path / "runs" / "x")
    assert config.optimizer.prodigy_d_coef == 2.0 and config.optimizer.lr == 1.0
    plan = RunPlan("adamw", spec.base_model, 8, 5e-4, 0, spec.steps)
    config = run_config(spec, plan, Path("base"), (tmp_path / "a", tmp_path / "b"), tmp_path / "runs" / "x")
    assert config.optimizer.lr == 5e-4 and config.schedule.scheduler == "cosine" and config.schedule.max_steps >= 200
    # width's LR is kept from the narrowest DiT (its reference), rank's from the base point
    width = next(a for a in spec.axes if a.name == "width")
    records = [{**_record("adamw", 8, lr, 0, loss), "model": model}
               for model, best in (("flux_pre", 4e-3), (spec.base_model, 1e-3))
               for lr, loss in ((1e-3, 0.3 if best != 1e-3 else 0.1), (4e-3, 0.2 if best == 4e-3 else 0.4))]
    table = cells(records)
    assert kept_lr(spec, table, "adamw", width) == 4e-3
    assert kept_lr(spec, table, "adamw") == 1e-3


def test_reference_must_be_one_of_the_axis_values(tmp_path: Path) -> None:
    text = V2.read_text().replace("reference: flux_pre}", "reference: sd3_pre}", 1)
    bad = tmp_path / "v2.yaml"
    bad.write_text(text.replace("base_config: ../", f"base_config: {REPO}/"))
    with pytest.raises(SweepError, match=r"axes.width.reference: 'sd3_pre' is not one of its values"):
        load_sweep(bad)


def test_dit_width_and_depth_variants_scale_heads_and_blocks() -> None:
    import dataclasses

    from lab.sweep.models import scaled_flow_transformer
    from lab.sweep.spec import ModelSpec
    from tuneonce.model.tiny_flow import tiny_flux_transformer

    base = tiny_flux_transformer(guidance=True, latent_channels=4)
    spec = ModelSpec("x", "flux", "demo_flux", width_multiplier=4)
    wide = scaled_flow_transformer(base, spec)
    assert wide.config.num_attention_heads == 4 * base.config.num_attention_heads
    assert wide.config.attention_head_dim == base.config.attention_head_dim  # head dimension kept (muP's widening)
    assert wide.x_embedder.weight.shape[0] == 4 * base.x_embedder.weight.shape[0]
    narrow = scaled_flow_transformer(base, dataclasses.replace(spec, width_multiplier=0.5))
    assert narrow.config.num_attention_heads * 2 == base.config.num_attention_heads
    with pytest.raises(ValueError, match="0.25 gives 0.5 attention heads"):
        scaled_flow_transformer(base, dataclasses.replace(spec, width_multiplier=0.25))
    deep = scaled_flow_transformer(base, dataclasses.replace(spec, width_multiplier=1, depth_multiplier=2))
    assert (len(deep.transformer_blocks), len(deep.single_transformer_blocks)) == (
        2 * len(base.transformer_blocks), 2 * len(base.single_transformer_blocks))


def test_a_run_stopped_by_a_signal_is_not_recorded_and_stops_the_sweep(tmp_path: Path, monkeypatch) -> None:
    """SIGTERM/Ctrl-C stop the training loop after a step; a sweep must not file that half run as finished."""
    from lab.sweep import runner
    from tuneonce.trainer import train as train_module

    calls = []

    def stopped_train(config, show_progress=False):
        calls.append(config)
        return train_module.RunResult(steps=3, final_loss=0.1, val_losses=[(0, 0.5)], interrupted=True)

    monkeypatch.setattr(train_module, "train", stopped_train)
    monkeypatch.setattr(runner, "prepare_model", lambda spec, cache: tmp_path / "model")
    monkeypatch.setattr(runner, "prepare_data", lambda root, n, m: (tmp_path / "a", tmp_path / "b"))
    spec = restrict(load_sweep(QUICK), seeds=[0])
    logged = []
    records = run_sweep(spec, tmp_path / "out", log=logged.append)
    assert len(calls) == 1 and records == []  # stopped at the first run, nothing filed
    assert any("stopped" in line and "rerun" in line for line in logged)


def test_restrict_to_models_keeps_their_model_cells_and_rank_axes_only_with_the_base_model() -> None:
    spec = load_sweep(V2)
    only_dit = restrict(spec, models=["flux_pre"])
    assert {p.model for p in only_dit.runs()} == {"flux_pre"}
    assert "rank" not in {a.name for a in only_dit.axes}
    with_base = restrict(spec, axes=["rank", "family"], models=[spec.base_model])
    assert {p.model for p in with_base.runs()} == {spec.base_model}
    assert {p.rank for p in with_base.runs()} == {2, 8, 64}
    with pytest.raises(SweepError, match="--models: 'nope' is not in the sweep"):
        restrict(spec, models=["nope"])


def test_length_check_compares_best_lrs_and_costs_the_short_runs_lr_at_the_long_length(tmp_path: Path) -> None:
    from lab.sweep.length import length_rows, main

    short = {1e-3: [0.50, 0.52], 2e-3: [0.40, 0.42], 4e-3: [0.45, 0.47]}  # best 2e-3
    long = {1e-3: [0.30, 0.32], 2e-3: [0.33, 0.33], 4e-3: [0.50, 0.55]}  # best moves one step down to 1e-3
    records = [{**_record("a", 8, lr, s, v), "steps": n, "seconds": 2.0 * n / 200}
               for n, grid in ((200, short), (400, long)) for lr, vs in grid.items() for s, v in enumerate(vs)]
    records.append({**_record("b", 8, 1e-3, 0, 0.4), "steps": 200})  # only one length: no row
    (row,) = length_rows(records, 200, 400)
    assert (row["best_short"], row["best_long"], row["steps_apart"]) == (2e-3, 1e-3, 1)
    assert row["cost"] == pytest.approx((0.33 / 0.30 + 0.33 / 0.32) / 2)
    assert (row["seconds_short"], row["seconds_long"], row["seeds"]) == (12.0, 24.0, 2)
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main([str(path)]) == 0
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "missing.jsonl")])
    assert info.value.code == 2
