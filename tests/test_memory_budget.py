"""Parking the encoders after caching (modules/trainer/parking.py) and memory.budget_gb acting on a run
(modules/trainer/budget.py), on tiny Flux pipelines through train() and the CLI."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tuneonce.config.loading import dump_config
from tuneonce.model.families import get_family
from tuneonce.model.quantize import QuantLinear
from tuneonce.trainer import cli, parking
from tuneonce.trainer.memory_plan import GIB, HEADROOM, PlanSettings, plan_memory, settings_from_config
from tuneonce.trainer.train import train
from tests.builders import FLOW_RUN, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parking_moves_out_and_borrows_back(monkeypatch):
    components = {"vae": nn.Linear(2, 2), "text_encoder": nn.Linear(2, 2), "transformer": nn.Linear(2, 2),
                  "tokenizer": object(), "text_encoder_2": None}  # fmt: skip
    names, moves = {id(m): n for n, m in components.items()}, []
    # a CUDA compute device: the moves are recorded, not made (this machine has none)
    monkeypatch.setattr(parking, "move", lambda module, device: moves.append((names[id(module)], str(device))))
    lot = parking.Parking(components, ["vae", "text_encoder", "text_encoder_2", "tokenizer"], compute="cuda")
    assert lot.names == ["vae", "text_encoder"]  # absent and non-module components are skipped
    lot.park()
    assert moves == [("vae", "cpu"), ("text_encoder", "cpu")]
    moves.clear()
    with lot.borrowed():
        assert moves == [("vae", "cuda"), ("text_encoder", "cuda")]
    assert moves[2:] == [("vae", "cpu"), ("text_encoder", "cpu")]
    moves.clear()
    with parking.Parking(components, [], compute="cuda").borrowed():  # nothing parked: nothing moves
        pass
    assert moves == []


def test_run_parks_encoders_after_caching_and_borrows_them_for_samples(monkeypatch, tmp_path, flux_base, data_dirs):
    events = []

    def spy_move(module, device):
        kind = type(module).__name__
        events.append(("move", kind, str(device), any((tmp_path / "out" / "cache").rglob("*.safetensors"))))
        module.to(device)

    monkeypatch.setattr(parking, "move", spy_move)
    import tuneonce.trainer.sampling as sampling

    real_sample = sampling.sample_images
    monkeypatch.setattr(sampling, "sample_images", lambda *a, **k: events.append(("sample",)) or real_sample(*a, **k))
    cfg = tiny_train_config("flux", flux_base, data_dirs, tmp_path / "out", defaults=FLOW_RUN,
                            schedule={"max_steps": 2},
                            sampling={"at_end": True, "prompts": [{"prompt": "a red square", "steps": 1, "cfg": 1.0,
                                                                   "width": 64, "height": 64}]})  # fmt: skip
    result = train(cfg, show_progress=False)
    assert result.samples and result.steps == 2
    parked = [("move", kind, "cpu", True) for kind in ("AutoencoderKL", "CLIPTextModel", "T5EncoderModel")]
    assert events[:3] == parked  # after the caches are written: the VAE and both text encoders
    assert events[3:] == parked + [("sample",)] + parked  # borrowed for the samples (CPU here), parked again
    # without the caches nothing is parked
    events.clear()
    cfg = tiny_train_config("flux", flux_base, data_dirs, tmp_path / "plain", defaults=FLOW_RUN,
                            schedule={"max_steps": 1},
                            data={"cache_latents": False, "cache_text_embeddings": False})  # fmt: skip
    train(cfg, show_progress=False)
    assert events == []


def tiny_components(base):
    family = get_family("flux")
    return family, family.load(base, dtype=torch.float32)


def test_planner_counts_parked_components_only_while_caching_and_sampling(flux_base):
    _, components = tiny_components(flux_base)
    resident = plan_memory(components, PlanSettings(resolution=64, train_dtype="float32", text_tokens=8))
    lot = PlanSettings(resolution=64, train_dtype="float32", text_tokens=8,
                       parked=["vae", "text_encoder", "text_encoder_2"])  # fmt: skip
    parked = plan_memory(components, lot)
    # every tensor at model.train_dtype's 4 bytes (the position-id buffers too), the VAE's at its own
    encoder_bytes = sum(t.numel() * (t.element_size() if n == "vae" else 4) for n in ("vae", "text_encoder",
                        "text_encoder_2") for t in [*components[n].parameters(), *components[n].buffers()])  # fmt: skip
    assert parked.parked == pytest.approx(encoder_bytes)
    assert parked.weight_bytes == pytest.approx(resident.weight_bytes - encoder_bytes)
    assert parked.training_peak == pytest.approx(resident.peak - encoder_bytes)
    assert parked.caching_peak == pytest.approx(encoder_bytes) and parked.sampling_peak == 0
    sampled = plan_memory(components, PlanSettings(**{**lot.__dict__, "samples": True}))
    assert sampled.sampling_peak == pytest.approx(resident.peak - resident.activations)


def test_budget_turns_on_quantization_and_says_so(capsys, tmp_path, flux_base, data_dirs):
    cfg = tiny_train_config("flux", flux_base, data_dirs, tmp_path / "out", defaults=FLOW_RUN,
                            schedule={"max_steps": 1},
                            validation={"every_n_steps": 0})  # fmt: skip
    family, components = tiny_components(flux_base)
    settings, _ = settings_from_config(cfg, backbone="transformer")
    checkpointed = plan_memory(components, PlanSettings(**{**settings.__dict__, "checkpointing": True}))
    unplanned = plan_memory(components, settings)
    budget = 0.98 * checkpointed.peak / (1 - HEADROOM) / GIB  # checkpointing alone is not enough
    assert unplanned.peak > budget * GIB * (1 - HEADROOM)
    planned = cfg.model_copy(update={"memory": cfg.memory.model_copy(update={"budget_gb": budget})})
    result = train(planned, show_progress=False)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("memory.budget_gb"))
    assert "training.gradient_checkpointing: true" in line and "memory.quantize.denoiser: int8" in line
    predicted = float(line.rsplit("predicted peak ", 1)[1].split()[0])
    assert predicted * GIB <= budget * GIB * (1 - HEADROOM) * 1.001 < unplanned.peak
    quantized = [m for m in result.components["transformer"].modules() if isinstance(m, QuantLinear)]
    assert quantized and {m.mode for m in quantized} == {"int8"} and result.steps == 1


def test_impossible_budget_is_one_line_exit_2(capsys, tmp_path, flux_base, data_dirs):
    cfg = tiny_train_config("flux", flux_base, data_dirs, tmp_path / "out", defaults=FLOW_RUN,
                            memory={"budget_gb": 1e-6})  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    assert cli.main(["--config", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: memory.budget_gb: 1e-06 GiB is too small for this run")
    assert "memory.quantize.denoiser: nf4" in err[0] and "predicted peak" in err[0]
    assert not list((tmp_path / "out").glob("*.safetensors"))
    with pytest.raises(ValidationError, match="memory.budget_gb: the memory planner plans LoRA runs"):
        tiny_train_config("flux", flux_base, data_dirs, tmp_path, defaults=FLOW_RUN, method="finetune",
                          memory={"budget_gb": 8})  # fmt: skip
