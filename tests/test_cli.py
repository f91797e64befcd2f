"""The CLI front door: exit codes, one-line errors before heavy imports, dry run, hand-off to run_training."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from tuneonce.config import TrainConfig, load_config
from tuneonce.trainer import cli

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "training_presets" / "demo_sdxl_lora.yaml"


@pytest.fixture
def fake_training(monkeypatch):
    """Stands in for tuneonce.trainer.train so the CLI's hand-off can be observed without training."""
    calls: list[TrainConfig] = []
    module = types.ModuleType("tuneonce.trainer.train")

    def run_training(config):
        calls.append(config)
        return module.result

    module.run_training = run_training
    module.result = None
    monkeypatch.setitem(sys.modules, "tuneonce.trainer.train", module)
    return module, calls


def test_runs_training_with_the_validated_config(fake_training, capsys):
    module, calls = fake_training
    rc = cli.main(["--config", str(DEMO), "--set", "schedule.max_steps=7", "--set", "optimizer.lr=2e-3"])
    assert cli.main(["--config", str(DEMO), "--set", "schedule.max_steps=7", "optimizer.lr=2e-3"]) == 0  # both forms
    assert rc == 0
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[0] == load_config(DEMO, ["schedule.max_steps=7", "optimizer.lr=2e-3"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and "sdxl lora r8" in out[0] and "muon_adv lr 0.002" in out[0] and "7 steps" in out[0]


def test_return_code_of_training_is_passed_on(fake_training):
    module, _ = fake_training
    module.result = 3
    assert cli.main(["--config", str(DEMO)]) == 3


def test_config_error_is_one_line_exit_2_and_never_trains(fake_training, capsys):
    _, calls = fake_training
    rc = cli.main(["--config", str(DEMO), "--set", "optimizer.lrr=1"])
    assert rc == 2 and calls == []
    err = capsys.readouterr().err
    assert err == "config error: --set: optimizer.lrr: unknown key (did you mean 'optimizer.lr'?)\n"


def test_debug_shows_the_traceback(fake_training, capsys):
    assert cli.main(["--config", str(DEMO), "--set", "lora.rank=0", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("lora.rank: Input should be greater than or equal to 1, got 0")


def test_dry_run_prints_yaml_that_loads_back(fake_training, capsys, tmp_path):
    _, calls = fake_training
    assert cli.main(["--config", str(DEMO), "--dry-run", "--set", "lora.rank=4"]) == 0
    assert calls == []
    text = capsys.readouterr().out
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(text)
    assert yaml.safe_load(text)["lora"]["rank"] == 4
    assert load_config(resolved) == load_config(DEMO, ["lora.rank=4"])


def test_warnings_go_to_stderr(fake_training, capsys):
    assert cli.main(["--config", str(DEMO), "--dry-run", "--set", "lora.alpha=1"]) == 0
    assert "warning: lora.alpha 1 != rank 8" in capsys.readouterr().err


def test_script_fails_fast_without_importing_torch(tmp_path):
    """A bad config exits 2 through scripts/train.py before torch/diffusers are imported."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['train.py', '--config', {str(DEMO)!r}, '--set', 'optimizer.type=lion']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'scripts' / 'train.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "    print('exit', e.code, 'heavy', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.stdout.strip() == "exit 2 heavy []", done.stderr
    assert done.stderr.strip().splitlines() == [
        "config error: --set: optimizer.type: Input should be 'muon_adv', 'adamuon_adv', 'lora_muon', "
        "'adamw', 'torch_muon' or 'prodigy', got 'lion'"
    ]


def test_console_script_points_at_main():
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1]
    assert 'tuneonce-train = "tuneonce.trainer.cli:main"' in scripts.split("[", 1)[0]


def test_missing_config_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2 and "--config" in capsys.readouterr().err


def test_missing_base_model_folder_is_one_line_error(tmp_path, capsys):
    """Bad input found when the run opens the model (not by the schema) also ends in one line naming it."""
    missing = tmp_path / "no_such_model"
    rc = cli.main(["--config", str(DEMO), "--set", f"model.base_model={missing}", f"saving.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # imports may log other lines
    assert rc == 2  # bad input, like a config error
    assert len(errors) == 1 and str(missing) in errors[0] and "model.base_model" in errors[0]
    assert "Traceback" not in err
