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
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tuneonce.config.schema import TrainConfig
from tuneonce.model.tiny import tiny_pipeline_dir
from tuneonce.trainer import checkpoint as ckpt
from tuneonce.trainer import loop
from tuneonce.trainer.metrics import read_metrics
from tuneonce.trainer.train import train
from tests.builders import concept_data_dirs, signal_in_step, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent
STEPS, EVERY = 6, 2  # 4 images, batch 2: checkpoints at epoch ends (steps 2, 4); Ctrl-C at step 3 stops mid-epoch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_pipeline_dir("sd15", tmp_path_factory)
    data = concept_data_dirs(tmp_path_factory.mktemp("data"), train_count=4)
    cache = tmp_path_factory.mktemp("cache")  # latents and text embeddings encoded once for all the runs

    def config(out: Path, **sections):
        defaults = {
            "data": {"cache_dir": str(cache)},
            "schedule": {"max_steps": STEPS, "scheduler": "cosine", "warmup_steps": 2},  # the scheduler's step matters
            "training": {"batch_size": 2, "seed": 3, "ema": {"enabled": True, "decay": 0.9}},
            "validation": {"every_n_steps": 3, "folder": str(data[1]), "num_timesteps": 2},
            "saving": {"output_dir": str(out), "name": "run", "checkpoint_every_n_steps": EVERY},
        }
        return tiny_train_config("sd15", base, data, out, defaults=defaults, **sections)

    return base, config


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run (its checkpoints step000002 and step000004 serve the fallback tests)."""
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


def killed_run(config_json: str, block_at: int, blocked) -> None:
    """The run in a forked process, held inside the forward of step `block_at` (after the step-4 checkpoint) until
    it is killed."""
    torch.set_num_threads(1)
    calls, real = [0], loop.compute_loss

    def blocking(parts, batch):
        calls[0] += 1
        if calls[0] == block_at:
            blocked.set()
            time.sleep(600)
        return real(parts, batch)

    loop.compute_loss = blocking
    train(TrainConfig.model_validate_json(config_json), show_progress=False)


def test_run_killed_with_sigkill_resumes_bit_identical(setup, reference, tmp_path):
    _, config = setup
    out = tmp_path / "run"
    # A forked child starts without importing torch/diffusers again; it is killed as any process would be.
    context = multiprocessing.get_context("fork")
    blocked = context.Event()
    child = context.Process(target=killed_run, args=(config(out).model_dump_json(), 6, blocked), daemon=True)
    child.start()
    try:
        deadline = time.monotonic() + 300
        while not blocked.wait(0.1):
            assert child.is_alive(), f"the training process ended early (exit code {child.exitcode})"
            assert time.monotonic() < deadline, "the training process did not reach step 6"
        os.kill(child.pid, signal.SIGKILL)
        child.join(60)
        assert child.exitcode == -signal.SIGKILL
    finally:
        if child.is_alive():
            child.kill()
    root = out / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step000002", "step000004"]
    assert not (out / "run.safetensors").exists()

    result = train(config(out, resume="latest"), show_progress=False)
    assert result.resumed_from == root / "step000004"
    reference_out, reference_result = reference
    assert_same_run(result, reference_result, out, reference_out)
    steps = [r["step"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # the killed run's step 5 was dropped and logged again


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes(setup, reference, tmp_path, monkeypatch):
    _, config = setup
    out = tmp_path / "run"
    real = loop.compute_loss
    signal_in_step(monkeypatch, 3, signal.SIGINT)
    handler = signal.getsignal(signal.SIGINT)
    workers = {"data": {"num_workers": 1}}  # the worker prefetches past the step: the position is the batch's own
    stopped = train(config(out, **workers), show_progress=False)
    assert signal.getsignal(signal.SIGINT) is handler  # the run's handler is gone again
    monkeypatch.setattr(loop, "compute_loss", real)
    assert stopped.interrupted and stopped.steps == 3
    assert stopped.checkpoint == out / "checkpoints" / "step000003"
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step000002", "step000003"]
    assert not (out / "run.safetensors").exists()  # not finished: no final file

    result = train(config(out, resume=str(out / "checkpoints" / "step000003"), **workers), show_progress=False)
    reference_out, reference_result = reference
    assert_same_run(result, reference_result, out, reference_out)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(setup, reference, tmp_path, caplog):
    _, config = setup
    reference_out, reference_result = reference
    out = tmp_path / "run"
    shutil.copytree(reference_out / "checkpoints", out / "checkpoints")
    weights = out / "checkpoints" / "step000004" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated by a crash of the disk, not by us
    with caplog.at_level(logging.WARNING, logger="tuneonce.checkpoint"):
        result = train(config(out, resume="latest"), show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tuneonce.checkpoint"]
    assert any("step000004" in w and "weights.safetensors" in w for w in warnings), warnings
    assert result.resumed_from == out / "checkpoints" / "step000002"
    assert_same_run(result, reference_result, out, reference_out)


def test_out_of_disk_during_save_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    _, config = setup
    out = tmp_path / "run"
    real = ckpt.write_safetensors

    def disk_full_at_step_2(tensors, path):
        if "step000002" in str(path) and path.name == ckpt.OPTIMIZER:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(tensors, path)

    monkeypatch.setattr(ckpt, "write_safetensors", disk_full_at_step_2)
    with pytest.raises(ckpt.CheckpointError) as failure:
        train(config(out, saving={"checkpoint_every_n_steps": 1}), show_progress=False)
    message = str(failure.value)
    assert "step000002" in message and "No space left on device" in message and "step000001 is intact" in message
    assert "\n" not in message
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step000001"]  # no half-written folder left behind
    snapshot = ckpt.read_checkpoint(root / "step000001")
    assert snapshot.step == 1 and snapshot.optimizer["state"] and snapshot.ema["num_updates"] == 1


def test_resuming_another_adapter_shape_is_a_clear_error(setup, reference, tmp_path):
    _, config = setup
    reference_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(reference_out / "checkpoints", out / "checkpoints")
    with pytest.raises(ckpt.ResumeMismatch, match="step000004") as failure:
        train(config(out, resume="latest", lora={"rank": 8}), show_progress=False)
    message = str(failure.value)
    assert "lora.rank: 4 -> 8" in message and "lora_A" in message and "\n" not in message


@pytest.mark.parametrize("change", ["base_model", "family", "method"])
def test_resuming_another_model_or_method_is_a_clear_error(setup, reference, tmp_path, change):
    base, config = setup
    reference_out, _ = reference
    snapshot = ckpt.read_checkpoint(reference_out / "checkpoints" / "step000004")
    other = {
        "base_model": ({"model": {"base_model": str(tmp_path / "other_base")}}, f"model.base_model={base}"),
        "family": ({"model": {"family": "sd2"}}, "model.family=sd15, this run has sd2"),
        "method": ({"method": "finetune"}, "is a lora run, this run is finetune"),
    }
    sections, expected = other[change]
    params = ckpt.trained_parameters({"unet": reference[1].components["unet"]})
    with pytest.raises(ckpt.ResumeMismatch, match="step000004") as failure:
        ckpt.check_fits(snapshot, config(tmp_path, **sections), params)  # checked before any weight is touched
    assert expected in str(failure.value) and "\n" not in str(failure.value)


def test_unreadable_checkpoints_are_named_with_the_reason(reference, tmp_path):
    reference_out, _ = reference
    good = reference_out / "checkpoints" / "step000002"
    breakages = {
        "state.json": lambda p: (p / ckpt.MANIFEST).write_text("{not json"),
        "optimizer.safetensors": lambda p: (p / ckpt.OPTIMIZER).unlink(),
        "rng_rank0.json": lambda p: (p / "rng_rank0.json").write_text(json.dumps({"rng": {"__tensor__": "x"}, "tensors": {}}) + " " * 10),
    }
    for what, breaking in breakages.items():
        broken = tmp_path / what / "step000002"
        shutil.copytree(good, broken)
        breaking(broken)
        with pytest.raises(ckpt.CorruptCheckpoint, match="checkpoint step000002") as failure:
            ckpt.read_checkpoint(broken)
        assert "\n" not in str(failure.value)
    with pytest.raises(ckpt.CheckpointError, match="none of the 1 checkpoints"):
        ckpt.find_checkpoint(str(tmp_path / "state.json"), tmp_path)
    assert ckpt.find_checkpoint("latest", tmp_path / "fresh") is None  # nothing to resume yet: start fresh
    with pytest.raises(FileNotFoundError, match="resume: .*step000009 does not exist"):
        ckpt.find_checkpoint(str(tmp_path / "step000009"), tmp_path)


def test_other_lora_targets_are_named(setup, reference, tmp_path):
    _, config = setup
    reference_out, reference_result = reference
    snapshot = ckpt.read_checkpoint(reference_out / "checkpoints" / "step000004")
    params = ckpt.trained_parameters({"unet": reference_result.components["unet"]})
    fewer = {k: p for k, p in params.items() if ".to_k." not in k}  # as if lora.targets left out to_k
    with pytest.raises(ckpt.ResumeMismatch, match="trains other layers than this run .*lora.targets: 'default' -> 'attn'"
                       r".*0 of this run's parameters missing, \d+ extra \(e.g. unet\..*to_k"):
        ckpt.check_fits(snapshot, config(tmp_path, lora={"targets": "attn"}), fewer)


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
    from tuneonce.trainer import cli

    demo = ROOT / "training_presets" / "demo_sdxl_lora.yaml"
    assert cli.main(["--config", str(demo), "--resume", "latest", "--dry-run"]) == 0
    assert "resume: latest" in capsys.readouterr().out


def test_full_finetune_with_adamw_and_accumulation_resumes_bit_identical(setup, tmp_path):
    """The whole backbone and AdamW's state (tensor step counts) go through a checkpoint taken at an epoch's end, between
    accumulation windows."""
    _, config = setup
    sections = dict(
        method="finetune", optimizer={"type": "adamw", "lr": 1e-4}, schedule={"max_steps": 2},
        training={"gradient_accumulation": 2, "ema": {"enabled": False}}, validation={"every_n_steps": 0},
    )  # fmt: skip
    whole = train(config(tmp_path / "whole", saving={"checkpoint_every_n_steps": 1}, **sections), show_progress=False)
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoints", out / "checkpoints")
    snapshot = ckpt.read_checkpoint(out / "checkpoints" / "step000001")
    assert snapshot.sampler == {"epoch": 0, "position": 2, "seed": 3, "num_items": 4} and len(snapshot.weights) == len(list(whole.components["unet"].parameters()))
    resumed = train(config(out, resume="latest", **sections), show_progress=False)
    assert resumed.resumed_from == out / "checkpoints" / "step000001" and resumed.steps == 2
    ours, theirs = resumed.components["unet"].state_dict(), whole.components["unet"].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
