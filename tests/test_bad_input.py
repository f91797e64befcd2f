"""The bad-input table: every case runs the real CLI (`python scripts/train.py --config ... --set ...`) as a
subprocess on a tiny SD1.5 pipeline and checks the exit code, that one line names the field / file / value, that
there is no traceback, and that the files a previous run left in the output folder are unchanged.

Cases that fail at validation or at the output checks exit before torch is imported (well under a second); the
others train at most two 64 px steps.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from tuneonce.model.tiny import tiny_pipeline_dir
from tuneonce.trainer import preflight
from tests.builders import concept_data_dirs, signal_in_step

ROOT = Path(__file__).resolve().parent.parent
PREVIOUS = b"a LoRA file from an earlier run"  # what an earlier run left; no case may change it


@dataclass
class Env:
    base: Path
    train_dir: Path
    cache: Path
    config: dict


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    base = tiny_pipeline_dir("sd15", tmp_path_factory)
    train_dir, _ = concept_data_dirs(tmp_path_factory.mktemp("data"), train_count=4)
    cache = tmp_path_factory.mktemp("cache")  # shared: the image and caption encodings are done once
    config = {
        "config_version": 2,
        "model": {"family": "sd15", "base_model": str(base)},
        "lora": {"rank": 4},
        "data": {"folders": [{"path": str(train_dir)}], "resolution": 64, "bucketing": False, "cache_dir": str(cache)},
        "optimizer": {"type": "muon_adv"},
        "schedule": {"max_steps": 2},
        "training": {"batch_size": 2, "seed": 3},
        "saving": {"name": "run"},
        "logging": {"tensorboard": False},
    }
    return Env(base, train_dir, cache, config)


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    out: Path

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith(("error:", "config error:"))]

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if "warning" in line or line.startswith("skipping")]


def files_of(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def run_cli(env: Env, tmp: Path, sets: list[str], *, config_text: str | None = None, config_path: Path | None = None,
            extra: list[str] = ()) -> Outcome:  # fmt: skip
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    (out / "run.safetensors").write_bytes(PREVIOUS)
    cfg = dict(env.config, saving={**env.config["saving"], "output_dir": str(out)})
    if config_path is None:
        config_path = tmp / "config.yaml"
        config_path.write_text(config_text if config_text is not None else yaml.safe_dump(cfg), encoding="utf-8")
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(config_path), *extra]
    if sets:
        command += ["--set", *sets]
    # CPU on every machine: the memory bound is the CPU's (an accelerator fuses the attention it counts there)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp, timeout=300, env=environment)
    return Outcome(done.returncode, done.stdout, done.stderr, out)


def write_folder(path: Path, images: dict[str, bytes | None], captions: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    for name, data in images.items():
        if data is None:
            Image.new("RGB", (64, 64), (200, 40, 200)).save(path / name)
        else:
            (path / name).write_bytes(data)
    for name, data in captions.items():
        (path / name).write_bytes(data)
    return path


# ---- the table ------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    sets: list[str] = field(default_factory=list)
    rc: int = 2
    says: tuple[str, ...] = ()  # substrings of the one error line (rc != 0) or of a warning line (rc == 0)
    prepare: Callable[[Env, Path], dict] | None = None  # returns run_cli keyword arguments
    check: Callable[[Outcome], None] | None = None
    fast: bool = True  # fails before torch is imported: nothing at all may appear in the output folder


def _missing_config(env, tmp):
    return {"config_path": tmp / "no_such_config.yaml"}


def _text(text):
    return lambda env, tmp: {"config_text": text}


def _newer_version(env, tmp):  # in the file (--set config_version is refused: see its own case)
    return {"config_text": yaml.safe_dump(dict(env.config, config_version=99))}


def _old_version(env, tmp):
    old = {k: v for k, v in env.config.items() if k not in ("optimizer", "schedule")}
    old |= {"config_version": 1, "optimizer": {"name": "muon_adv", "learning_rate": 2e-3},
            "training": {"batch_size": 2, "max_steps": 2}}  # fmt: skip
    old["saving"] = {"name": "run", "output_dir": str(tmp / "out")}
    return {"config_text": yaml.safe_dump(old), "extra": ["--dry-run"]}


def _empty_folder(env, tmp):
    (tmp / "empty").mkdir()
    return {}


def _corrupt_image(env, tmp):
    write_folder(tmp / "mixed", {"a.png": None, "b.png": None, "broken.png": b"\x89PNG not really"}, {})
    return {}


def _bad_caption(env, tmp):
    write_folder(tmp / "latin1", {"a.png": None, "b.png": None}, {"a.txt": "café zxq".encode("latin-1")})
    return {}


def _not_a_model(env, tmp):
    (tmp / "not_a_model").mkdir()
    (tmp / "not_a_model" / "readme.txt").write_text("no model here")
    return {}


def _output_is_file(env, tmp):
    (tmp / "taken").write_text("someone's file")
    return {}


def _lora_b_unmoved(outcome: Outcome) -> None:
    saved = load_file(outcome.out / "run.safetensors")
    ups = {k: v for k, v in saved.items() if "lora_up" in k}
    assert ups and all(not v.abs().sum() for v in ups.values())  # B starts at zero; lr 0 keeps it there


def _own_size(outcome: Outcome) -> None:
    saved = load_file(outcome.out / "run.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    assert "trained 2 steps" in outcome.stdout


def _no_samples(outcome: Outcome) -> None:
    assert not (outcome.out / "samples").exists()
    assert load_file(outcome.out / "run.safetensors")


def _samples_at_end(outcome: Outcome) -> None:
    assert [p.name for p in (outcome.out / "samples").iterdir()] == ["step000002_00.png"]
    assert load_file(outcome.out / "run.safetensors")


def _migrated(outcome: Outcome) -> None:
    resolved = yaml.safe_load(outcome.stdout)
    assert resolved["config_version"] == 2 and resolved["optimizer"]["lr"] == 2e-3
    assert resolved["schedule"]["max_steps"] == 2


PROMPT = "sampling.prompts=[{prompt: a zxq star, steps: 1, width: 64, height: 64}]"
CASES = {
    # found by the schema / loader: exit 2 before torch is imported
    "missing config file": Case(prepare=_missing_config, says=("no_such_config.yaml", "file not found")),
    "config is not a mapping": Case(prepare=_text("- model\n- data\n"), says=("config.yaml", "mapping")),
    "YAML syntax error": Case(prepare=_text("model: [sd15\ndata: {"), says=("config.yaml", "invalid YAML")),
    "unknown key": Case(["optimizer.lrr=1"], says=("optimizer.lrr", "did you mean 'optimizer.lr'")),
    "wrong type": Case(["lora.rank=abc"], says=("lora.rank", "abc")),
    "negative LR": Case(["optimizer.lr=-1"], says=("optimizer.lr", "-1")),
    "newer config version": Case(prepare=_newer_version, says=("config_version", "99")),
    "config version by --set": Case(["config_version=99"], says=("--set", "config_version", "cannot be overridden")),
    "old config version migrates": Case(rc=0, prepare=_old_version, check=_migrated),
    "resolution not a multiple of 8": Case(["data.resolution=100"], says=("data.resolution", "100")),
    # found when the run opens data and model: one line, exit 2 as well
    "missing data folder": Case(["data.folders=[{path: no_such_folder}]"], rc=2, says=("no_such_folder",), fast=False),
    "empty data folder": Case(["data.folders=[{path: empty}]"], rc=2, says=("empty", "no usable images"),
                              prepare=_empty_folder, fast=False),
    "corrupt image is skipped": Case(["data.folders=[{path: mixed}]"], rc=0, says=("broken.png",),
                                     prepare=_corrupt_image, fast=False),
    "bad caption encoding": Case(["data.folders=[{path: latin1}]"], rc=2, says=("a.txt", "utf-8"),
                                 prepare=_bad_caption, fast=False),
    "base_model missing": Case(["model.base_model=no_such_model"], rc=2, says=("model.base_model", "no_such_model"),
                               fast=False),
    "base_model not a model": Case(["model.base_model=not_a_model"], rc=2, says=("model.base_model", "not_a_model"),
                                   prepare=_not_a_model, fast=False),
    "lr 0 moves nothing": Case(["optimizer.lr=0", "optimizer.adam_lr=0"], rc=0, check=_lora_b_unmoved, fast=False),
    # issue #14
    "resolution 8192 on 64 px images trains at their size": Case(
        ["data.resolution=8192"], rc=0, says=("data.resolution 8192", "own size", "64x64"), check=_own_size,
        fast=False),
    "resolution 8192 with upscaling is refused": Case(
        ["data.resolution=8192", "data.upscale=true"], rc=2, says=("data.resolution", "8192x8192", "needs about"),
        fast=False),
    "sampling every 0 renders nothing": Case([PROMPT, "sampling.every_n_steps=0"], rc=0, says=("never sampled",),
                                             check=_no_samples, fast=False),
    "sampling.at_end renders the end": Case([PROMPT, "sampling.at_end=true"], rc=0, check=_samples_at_end, fast=False),
}
CASES |= {  # outputs: checked before any model loads
    "output_dir is a file": Case(["saving.output_dir=taken"], says=("saving.output_dir", "taken", "is a file"),
                                 prepare=_output_is_file),
    "output_dir not writable": Case(["saving.output_dir=/proc/tuneonce_out"],
                                    says=("saving.output_dir", "/proc/tuneonce_out", "not writable")),
    "log_dir inside a file": Case(["logging.log_dir=taken/logs"], says=("logging.log_dir", "taken/logs", "a file"),
                                  prepare=_output_is_file),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line(env, tmp_path, name):
    case = CASES[name]
    kwargs = case.prepare(env, tmp_path) if case.prepare else {}
    before = files_of(tmp_path / "out") if (tmp_path / "out").exists() else None
    outcome = run_cli(env, tmp_path, case.sets, **kwargs)
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.rc == case.rc, (outcome.rc, outcome.stderr[-3000:])
    assert (outcome.out / "run.safetensors").read_bytes() == PREVIOUS or case.rc == 0  # a finished run replaces it
    if case.rc != 0:
        assert len(outcome.errors) == 1, outcome.stderr
        line = outcome.errors[0]
        assert "\n" not in line and all(s in line for s in case.says), (line, case.says)
        if case.fast:  # nothing at all appeared or changed in the output folder
            assert files_of(outcome.out) == {"run.safetensors": hashlib.sha256(PREVIOUS).hexdigest()}
            assert before is None or before == files_of(outcome.out)
    else:
        assert not outcome.errors, outcome.stderr
        if case.says:
            assert any(all(s in w for s in case.says) for w in outcome.warnings), outcome.stderr[-3000:]
    if case.check:
        case.check(outcome)


# ---- the non-finite guard -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["muon_adv", "adamw"])
def test_diverging_run_stops_with_exit_3_and_writes_nothing_non_finite(env, tmp_path, optimizer):
    sets = ["optimizer.lr=1e30", f"optimizer.type={optimizer}", "schedule.max_steps=6",
            "saving.checkpoint_every_n_steps=1", "saving.save_every_n_steps=1"]  # fmt: skip
    outcome = run_cli(env, tmp_path, sets)
    assert outcome.rc == 3, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr
    assert len(outcome.errors) == 1
    assert "training diverged" in outcome.errors[0] and "training.max_nonfinite_steps 3" in outcome.errors[0]
    undone = [w for w in outcome.warnings if "non-finite" in w and "step undone" in w]
    assert len(undone) == 3 and "lora" in undone[0]  # each bad step named once, with the parameters to blame
    assert not [w for w in outcome.stderr.splitlines() if "step skipped" in w]  # no second report by the optimizer
    assert (outcome.out / "run.safetensors").read_bytes() == PREVIOUS  # no final file over the earlier run's
    for path in outcome.out.rglob("*.safetensors"):
        if path.read_bytes() == PREVIOUS:
            continue
        tensors = load_file(path)
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, (path, bad[:3])
    records = [json.loads(line) for line in (outcome.out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r.get("undone") for r in records if "loss" in r)
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_free_space_is_checked_against_the_estimate(env, tmp_path, monkeypatch):
    """A full disk cannot be made in a test: the free space the check reads is replaced."""
    from tuneonce.config.schema import TrainConfig

    cfg = TrainConfig.model_validate(dict(env.config, saving={"name": "run", "output_dir": str(tmp_path / "o")}))
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * 2**20})())
    with pytest.raises(preflight.InputError) as failure:
        preflight.check_outputs(cfg)
    message = str(failure.value)
    assert message.startswith("saving.output_dir: ") and str(tmp_path / "o") in message
    assert "10.0 MiB free" in message and "64.0 MiB" in message
    assert not (tmp_path / "o").exists()
    need, how = preflight.trained_output_bytes(cfg, 1000)
    assert need == 1000 * 4 + 1000 * 12 and "1,000 trained values" in how


# ---- Ctrl-C / SIGTERM -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_on_stop", [True, False])
def test_stop_writes_the_lora_so_far_beside_the_checkpoint(env, tmp_path, monkeypatch, save_on_stop):
    """In process (the signal arrives inside a chosen step, no waiting): SIGTERM in step 2 of 3 finishes the step,
    writes the checkpoint and, with saving.save_on_stop, the LoRA file of the weights so far."""
    import signal

    from tuneonce.config.schema import TrainConfig
    from tuneonce.trainer.train import train

    signal_in_step(monkeypatch, 2, signal.SIGTERM)
    out = tmp_path / "out"
    saving = {"name": "run", "output_dir": str(out), "save_on_stop": save_on_stop}
    cfg = TrainConfig.model_validate(dict(env.config, schedule={"max_steps": 3}, saving=saving))
    torch.set_num_threads(1)
    result = train(cfg, show_progress=False)
    assert result.interrupted and result.steps == 2 and result.checkpoint == out / "checkpoints" / "step000002"
    assert not (out / "run.safetensors").exists()  # the run did not finish: no final file
    saved = out / "run-step000002.safetensors"
    assert saved.exists() == save_on_stop and result.saved == ([saved] if save_on_stop else [])
    if save_on_stop:
        tensors = load_file(saved)
        weights = load_file(result.checkpoint / "weights.safetensors")
        ups = [v for k, v in tensors.items() if "lora_up" in k]
        assert ups and any(v.abs().sum() > 0 for v in ups)  # two steps moved B away from zero
        assert len(tensors) == 3 * len([k for k in weights if "lora_B" in k])  # down, up, alpha per adapter

