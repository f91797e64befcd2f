"""Smoke run of scripts/bench_optimizer.py on a toy-width real UNet (no timing asserts)."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_optimizer.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_optimizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_json_report_counts_what_each_optimizer_orthogonalizes(capsys):
    rc = _script().main(["--model", "tiny-sd15", "--rank", "2", "--steps", "1", "--warmup", "0", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "tiny-sd15" and report["rank"] == 2
    results = report["results"]
    expected = {"adamw", "torch_muon", "muon_adv", "muon_adv_product", "muon_adv_b_orth_a_adam", "muon_adv_a_signsgd",
                "adamuon_adv", "lora_muon"}  # fmt: skip
    assert expected <= set(results)
    matrices = results["adamw"]["matrices"]
    assert matrices == report["tensors"] > 0 and matrices % 2 == 0  # LoRA factors only, in pairs
    for name, r in results.items():
        assert set(r) == {"median_ms", "ratio_to_adamw", "state_bytes", "orthogonalized", "matrices"}
        assert r["median_ms"] > 0 and r["matrices"] == matrices, name
    assert results["adamw"]["ratio_to_adamw"] == 1.0 and results["adamw"]["orthogonalized"] == 0
    assert results["lora_muon"]["orthogonalized"] == results["muon_adv"]["orthogonalized"] == matrices
    assert results["muon_adv_b_orth_a_adam"]["orthogonalized"] == matrices // 2
    # torch.optim.Muon takes 2-D tensors only: the conv LoRA factors (proj_in/proj_out) go to its AdamW
    assert 0 < results["torch_muon"]["orthogonalized"] < matrices
    # one fp32 momentum per factor, nothing else; AdamW keeps two moments
    assert results["lora_muon"]["state_bytes"] == report["param_bytes"]
    assert results["adamw"]["state_bytes"] >= 2 * report["param_bytes"]


def test_bad_arguments_are_one_line_errors(capsys):
    assert _script().main(["--model", "nope-xl", "--rank", "2"]) == 2
    assert "nope-xl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _script().main(["--rank", "2"])  # --model is required
