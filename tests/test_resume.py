"""Resume that users can trust: a run killed with SIGKILL (or stopped by Ctrl-C) and resumed ends bit-identical to an
uninterrupted one; a full disk during a save or a corrupt newest checkpoint leaves the previous one in use; a
checkpoint of another adapter shape or model is a one-line error."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modules.model.tiny import tiny_pipeline_dir
from modules.trainer import checkpoint as ckpt
from modules.trainer import loop
from modules.trainer.metrics import read_metrics
from modules.trainer.train import train
from tests.builders import concept_data_dirs, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent
STEPS, EVERY = 8, 3  # 6 images, batch 2: 3 batches an epoch, so the checkpoint at step 6 ends an epoch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_pipeline_dir("sd15", tmp_path_factory)
    data = concept_data_dirs(tmp_path_factory.mktemp("data"), train_count=6)

    def config(out: Path, **sections):
        defaults = {
            "schedule": {"max_steps": STEPS},
            "training": {"batch_size": 2, "seed": 3, "ema": {"enabled": True, "decay": 0.9}},
            "validation": {"every_n_steps": 4, "folder": str(data[1]), "num_timesteps": 2},
            "saving": {"output_dir": str(out), "name": "run", "checkpoint_every_n_steps": EVERY},
        }
        return tiny_train_config("sd15", base, data, out, defaults=defaults, **sections)

    return base, config


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run (its checkpoints step000003 and step000006 serve the fallback tests)."""
    _, config = setup
    out = tmp_path_factory.mktemp("reference")
    return out, train(config(out), show_progress=False)


def trained(result) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in ckpt.trained_parameters({"unet": result.components["unet"]}).items()}


def assert_same_run(result, reference_result, out: Path, reference_out: Path) -> None:
    """Bit-identical trained weights, saved (EMA) LoRA file and final validation loss."""
    ours, theirs = trained(result), trained(reference_result)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"
    saved, expected = load_file(out / "run.safetensors"), load_file(reference_out / "run.safetensors")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    assert result.val_losses[-1] == reference_result.val_losses[-1]
    assert result.steps == STEPS


KILLED_RUN = """
import json, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from modules.config.schema import TrainConfig
from modules.trainer import loop
from modules.trainer.train import train

calls, real = [0], loop.compute_loss
def blocking(parts, batch):  # step {block}: stay inside the forward until killed
    calls[0] += 1
    if calls[0] == {block}:
        print("BLOCKED", flush=True)
        time.sleep(600)
    return real(parts, batch)
loop.compute_loss = blocking
train(TrainConfig.model_validate(json.load(open({config!r}))), show_progress=False)
"""


def test_run_killed_with_sigkill_resumes_bit_identical(setup, reference, tmp_path):
    _, config = setup
    out = tmp_path / "run"
    (tmp_path / "config.json").write_text(config(out).model_dump_json())
    script = KILLED_RUN.format(root=str(ROOT), block=EVERY * 2 + 1, config=str(tmp_path / "config.json"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("BLOCKED"):
                break
        assert lines and lines[-1].startswith("BLOCKED"), "the training subprocess ended early:\n" + "".join(lines[-20:])
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        proc.kill()
        proc.stdout.close()
    root = out / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step000003", "step000006"]
    assert not (out / "run.safetensors").exists()

    result = train(config(out, resume="latest"), show_progress=False)
    assert result.resumed_from == root / "step000006"
    reference_out, reference_result = reference
    assert_same_run(result, reference_result, out, reference_out)
    steps = [r["step"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # the killed run's step 7 was dropped and logged again


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes(setup, reference, tmp_path, monkeypatch):
    _, config = setup
    out = tmp_path / "run"
    calls, real = [0], loop.compute_loss

    def interrupted_in_step_4(parts, batch):
        calls[0] += 1
        if calls[0] == 4:
            signal.raise_signal(signal.SIGINT)
        return real(parts, batch)

    monkeypatch.setattr(loop, "compute_loss", interrupted_in_step_4)
    handler = signal.getsignal(signal.SIGINT)
    stopped = train(config(out), show_progress=False)
    assert signal.getsignal(signal.SIGINT) is handler  # the run's handler is gone again
    monkeypatch.setattr(loop, "compute_loss", real)
    assert stopped.interrupted and stopped.steps == 4
    assert stopped.checkpoint == out / "checkpoints" / "step000004"
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step000003", "step000004"]
    assert not (out / "run.safetensors").exists()  # not finished: no final file

    result = train(config(out, resume=str(out / "checkpoints" / "step000004")), show_progress=False)
    reference_out, reference_result = reference
    assert_same_run(result, reference_result, out, reference_out)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(setup, reference, tmp_path, caplog):
    _, config = setup
    reference_out, reference_result = reference
    out = tmp_path / "run"
    shutil.copytree(reference_out / "checkpoints", out / "checkpoints")
    weights = out / "checkpoints" / "step000006" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated by a crash of the disk, not by us
    with caplog.at_level(logging.WARNING, logger="tuneonce.checkpoint"):
        result = train(config(out, resume="latest"), show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tuneonce.checkpoint"]
    assert any("step000006" in w and "weights.safetensors" in w for w in warnings), warnings
    assert result.resumed_from == out / "checkpoints" / "step000003"
    assert_same_run(result, reference_result, out, reference_out)


def test_out_of_disk_during_save_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    _, config = setup
    out = tmp_path / "run"
    real = ckpt.write_safetensors

    def disk_full_at_step_6(tensors, path):
        if "step000006" in str(path) and path.name == ckpt.OPTIMIZER:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(tensors, path)

    monkeypatch.setattr(ckpt, "write_safetensors", disk_full_at_step_6)
    with pytest.raises(ckpt.CheckpointError) as failure:
        train(config(out), show_progress=False)
    message = str(failure.value)
    assert "step000006" in message and "No space left on device" in message and "step000003 is intact" in message
    assert "\n" not in message
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step000003"]  # no half-written folder left behind
    snapshot = ckpt.read_checkpoint(root / "step000003")
    assert snapshot.step == 3 and snapshot.optimizer["state"] and snapshot.ema["num_updates"] == 3


@pytest.mark.parametrize("change", ["rank", "base_model"])
def test_resuming_another_adapter_shape_or_model_is_a_clear_error(setup, reference, tmp_path, change):
    base, config = setup
    reference_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(reference_out / "checkpoints", out / "checkpoints")
    if change == "rank":
        cfg, expected = config(out, resume="latest", lora={"rank": 8}), "lora.rank: 4 -> 8"
    else:
        other = tmp_path / "other_base"
        shutil.copytree(base, other)
        cfg, expected = config(out, resume="latest", model={"base_model": str(other)}), f"model.base_model={base}"
    with pytest.raises(ckpt.ResumeMismatch, match="step000006") as failure:
        train(cfg, show_progress=False)
    assert expected in str(failure.value) and "\n" not in str(failure.value)


def test_unreadable_checkpoints_are_named_with_the_reason(reference, tmp_path):
    reference_out, _ = reference
    good = reference_out / "checkpoints" / "step000003"
    breakages = {
        "state.json": lambda p: (p / ckpt.MANIFEST).write_text("{not json"),
        "optimizer.safetensors": lambda p: (p / ckpt.OPTIMIZER).unlink(),
        "rng_rank0.json": lambda p: (p / "rng_rank0.json").write_text(json.dumps({"rng": {"__tensor__": "x"}, "tensors": {}}) + " " * 10),
    }
    for what, breaking in breakages.items():
        broken = tmp_path / what / "step000003"
        shutil.copytree(good, broken)
        breaking(broken)
        with pytest.raises(ckpt.CorruptCheckpoint, match="checkpoint step000003") as failure:
            ckpt.read_checkpoint(broken)
        assert "\n" not in str(failure.value)
    with pytest.raises(ckpt.CheckpointError, match="none of the 1 checkpoints"):
        ckpt.find_checkpoint(str(tmp_path / "state.json"), tmp_path)
    assert ckpt.find_checkpoint("latest", tmp_path / "fresh") is None  # nothing to resume yet: start fresh


def test_nested_state_round_trips_through_json_and_safetensors(tmp_path):
    state = {
        "state": {0: {"step": 3, "momentum": torch.arange(6.0).view(2, 3)}, 7: {"step": torch.tensor(2.0)}},
        "param_groups": [{"betas": (0.9, 0.999), "params": [0, 7], "fused": None, "lr": float("inf")}],
        "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2),
    }
    tensors: dict[str, torch.Tensor] = {}
    data = json.loads(json.dumps(ckpt.flatten_tensors(state, tensors)))
    ckpt.write_safetensors(tensors, tmp_path / "t.safetensors")
    back = ckpt.unflatten_tensors(data, load_file(tmp_path / "t.safetensors"))
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and back["param_groups"][0]["lr"] == float("inf")
    assert set(back["state"]) == {0, 7} and torch.equal(back["state"][0]["momentum"], state["state"][0]["momentum"])
    assert back["numpy"][0] == "MT19937" and back["numpy"][1].dtype == np.uint32 and list(back["numpy"][1]) == [0, 1, 2, 3]
    bucket = torch.zeros(2, 3)  # two state tensors viewing one stacked bucket, as Muon_adv keeps them
    ckpt.write_safetensors({"a": bucket[0], "b": bucket[1]}, tmp_path / "views.safetensors")
    assert load_file(tmp_path / "views.safetensors")["b"].shape == (3,)


def test_cli_resume_flag_sets_the_config_field(capsys):
    from modules.trainer import cli

    demo = ROOT / "training_presets" / "demo_sdxl_lora.yaml"
    assert cli.main(["--config", str(demo), "--resume", "latest", "--dry-run"]) == 0
    assert "resume: latest" in capsys.readouterr().out
