"""The LM LR-transfer task (lab.lm_task): the --quick sweep end to end (records, resume, pretrained cache, table with
the cost of one LR), the task's data and noise floor against values computed here, tuneonce's optimizer construction
on the Llama LoRA (fans, depth), and one-line errors for bad flags."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lab import lm_task
from lab.sweep.runner import RESULTS_NAME, read_results


def _main(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return lm_task.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm_quick")
    assert _main(["--quick", "--out", str(out)]) == 0
    return out


def test_quick_sweep_writes_one_finite_record_per_run(quick_out: Path) -> None:
    spec = lm_task.sweep_spec(lm_task.QUICK, lm_task.VARIANTS)
    records = read_results(quick_out / RESULTS_NAME)
    assert sorted(r["id"] for r in records) == sorted(p.run_id for p in spec.runs())
    assert len(records) == 18  # 3 optimizers x 2 LRs x (w32 r8, w64 r8, w64 r2)
    for r in records:
        assert "error" not in r, r
        assert math.isfinite(r["val_loss"]) and not r["diverged"]
        assert r["val_curve"][0] == [0, r["val_loss_start"]] and r["val_curve"][-1] == [20, r["val_loss"]]
        assert r["steps"] == 20 and r["seed"] == 0
    # every run of one width starts from the same pretrained weights and the same validation set
    starts = {(r["model"], r["rank"]): r["val_loss_start"] for r in records}
    assert all(r["val_loss_start"] == starts[(r["model"], r["rank"])] for r in records)


def test_table_has_the_cost_of_one_lr_computed_from_the_records(quick_out: Path) -> None:
    table = (quick_out / "table.md").read_text(encoding="utf-8")
    assert "Cost of one LR across width" in table and "Cost of one LR across rank" in table and "| worst |" in table
    floor = lm_task.ideal_loss(lm_task.finetune_data(lm_task.QUICK)[1], lm_task.FINETUNE_SHIFT)
    assert f"{floor:.4f} on this validation set" in table
    losses = {(r["model"], r["lr"]): r["val_loss"] for r in read_results(quick_out / RESULTS_NAME)
              if r["optimizer"] == "adamw" and r["rank"] == 8}  # fmt: skip
    kept = min((lr for m, lr in losses if m == "w64"), key=lambda lr: losses[("w64", lr)])
    best_w32 = min(v for (m, _), v in losses.items() if m == "w32")
    cost = losses[("w32", kept)] / best_w32
    row = next(line for line in table.splitlines() if line.startswith(f"| adamw | {kept:.3g} (base point's best)"))
    assert row.split(" | ")[2] == f"{cost:.3f} ± 0.000"


def test_rerun_skips_finished_runs_and_reuses_the_pretrained_cache(quick_out: Path, capsys) -> None:
    models = sorted((quick_out / "models").glob("*.safetensors"))
    assert [p.name.split("_")[0] for p in models] == ["w32", "w64"]
    stamps = [p.stat().st_mtime_ns for p in models]
    lines = len((quick_out / RESULTS_NAME).read_text(encoding="utf-8").splitlines())
    capsys.readouterr()
    assert _main(["--quick", "--out", str(quick_out)]) == 0
    assert "18 runs, 0 to run" in capsys.readouterr().out
    assert len((quick_out / RESULTS_NAME).read_text(encoding="utf-8").splitlines()) == lines
    variant = 'adam_a={"like": "muon_tuned", "lora_a_optimizer": "adam"}'
    assert _main(["--quick", "--out", str(quick_out), "--variant", variant, "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "pretrained w32: loaded" in out and "adam_a|w32|r8|lr0.016|s0|n20" in out
    assert [p.stat().st_mtime_ns for p in models] == stamps
    new = read_results(quick_out / RESULTS_NAME)[-1]
    assert new["optimizer"] == "adam_a" and math.isfinite(new["val_loss"])
    meta = json.loads(models[0].with_suffix(".json").read_text(encoding="utf-8"))
    assert meta["width"] == 32 and all(math.isfinite(v) for v in meta["val_loss"].values())


def test_data_follows_the_rule_and_the_noise_floor_matches_the_ideal_predictor() -> None:
    gen = torch.Generator().manual_seed(0)
    clean = lm_task.make_batch(3, 64, gen)
    x, y = clean[:, 1 : 1 + lm_task.LIST_LEN], clean[:, 2 + lm_task.LIST_LEN :]
    assert torch.equal(y, (x + 3) % 17) and (clean[:, 1 + lm_task.LIST_LEN] == lm_task.EQ).all()
    ops = {int(lm_task.make_batch(s, 1, gen)[0, 0]) for s in (*lm_task.PRETRAIN_SHIFTS, lm_task.FINETUNE_SHIFT)}
    assert len(ops) == 5 and max(ops) < lm_task.VOCAB
    noisy = lm_task.make_batch(-1, 20000, gen, noise=0.1)
    x, y = noisy[:, 1 : 1 + lm_task.LIST_LEN], noisy[:, 2 + lm_task.LIST_LEN :]
    right = y == (x - 1) % 17
    assert abs(right.float().mean().item() - (0.9 + 0.1 / 17)) < 0.005
    p_right, p_other = 0.9 + 0.1 / 17, 0.1 / 17  # the ideal predictor's probabilities; its loss is the floor
    ideal = -(right.float() * math.log(p_right) + (~right).float() * math.log(p_other)).mean().item()
    assert abs(ideal - lm_task.noise_floor(0.1)) < 0.01
    assert lm_task.ideal_loss(noisy, -1, 0.1) == pytest.approx(ideal, rel=1e-5)
    assert lm_task.ideal_loss(clean, 3, 0.1) == pytest.approx(-math.log(p_right), rel=1e-9)


def test_tuneonce_optimizer_sees_llama_lora_fans_and_depth() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    from tuneonce.model.depth import component_depth
    from tuneonce.optimizer.groups import peft_param_infos
    from tuneonce.optimizer.muon_adv import Muon_adv
    from tuneonce.optimizer.factory import build_optimizer

    model = lm_task.build_model(32, 3)
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=lm_task.LORA_TARGETS), model)
    depth = component_depth(model)
    assert (depth.depth, depth.source) == (3, "registry")
    infos = {i.name: i.spec for i in peft_param_infos(model, depth.depth)}
    assert len(infos) == 2 * 7 * 3  # A and B of 7 projections in 3 layers: nothing else trains
    up_a = infos["model.layers.0.mlp.up_proj.lora_A.default.weight"]
    down_b = infos["model.layers.0.mlp.down_proj.lora_B.default.weight"]
    assert (up_a.base_fan_in, up_a.base_fan_out, down_b.base_fan_in, down_b.base_fan_out) == (32, 128, 128, 32)
    assert up_a.lora_scale == 1.0 and up_a.depth == 3
    optimizer = build_optimizer(lm_task.optimizer_config(lm_task.VARIANTS["muon_tuned"], 4e-3),
                                peft_param_infos(model, depth.depth))  # fmt: skip
    assert isinstance(optimizer, Muon_adv) and all(g["lr"] == 4e-3 for g in optimizer.param_groups)


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["--axes", "depth"], "'depth'"), (["--optimizers", "sgd"], "'sgd'"),
     (["--variant", 'x={"like": "muon_tuned", "lora_a_optimiser": "adam"}'], "lora_a_optimiser"),
     (["--variant", 'x={"like": "adamw", "weight_decay": -1}'], "weight_decay: Input should be greater"),
     (["--variant", 'x={"like": "lion"}'], "'lion'"), (["--variant", "x={"], "not a JSON object"),
     (["--variant", 'x={"type": "adamw"}'], "lr_center must be a positive number")],
)  # fmt: skip
def test_bad_flags_exit_2_with_one_line(tmp_path: Path, capsys, argv: list[str], named: str) -> None:
    assert _main(["--quick", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and named in err
    assert not (tmp_path / "out").exists()
