"""A few real steps of the loop on tiny SD1.5 / SDXL pipelines loaded from saved diffusers folders."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuneonce.model.families import get_family
from tuneonce.model.tiny import tiny_pipeline_dir
from tuneonce.trainer.metrics import read_metrics
from tuneonce.trainer.train import train
from tests.builders import tiny_train_config


DATA_TRAIN_IMAGES = 6  # the conftest data_dirs fixture's training images
make_config = tiny_train_config


def base_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights of the base model (PEFT's `base_layer.` infix removed, adapter tensors skipped)."""
    return {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in module.named_parameters()
        if ".lora_" not in n
    }


@pytest.fixture(scope="module")
def sdxl_lora_run(tmp_path_factory, data_dirs):
    base = tiny_pipeline_dir("sdxl", tmp_path_factory)
    out = tmp_path_factory.mktemp("sdxl_lora")
    cfg = make_config(
        "sdxl", base, data_dirs, out,
        training={"gradient_accumulation": 2, "min_snr_gamma": 5.0, "noise_offset": 0.05, "timestep_sampling": "logit_normal"},
        lora={"rank": 4, "train_text_encoders": {"text_encoder": True}},
        data={"cache_text_embeddings": False},
        sampling={"every_n_steps": 3, "at_start": True,
                  "prompts": [{"prompt": "a zxq star", "steps": 2, "width": 64, "height": 64}]},
    )  # fmt: skip
    return base, cfg, train(cfg, show_progress=False)


def test_sdxl_lora_trains_adapters_only(sdxl_lora_run):
    base, cfg, result = sdxl_lora_run
    assert result.steps == 3 and math.isfinite(result.final_loss)
    fresh = get_family("sdxl").load(base)
    for name in ("unet", "text_encoder"):
        trained = result.components[name]
        lora_b = {n: p for n, p in trained.named_parameters() if ".lora_B." in n}
        unmoved = [n for n, p in lora_b.items() if not p.abs().sum() > 0]
        if name == "text_encoder":  # SDXL reads the penultimate layer: the last layer gets no gradient
            last = trained.config.num_hidden_layers - 1
            unmoved = [n for n in unmoved if f"layers.{last}." not in n]
        assert lora_b and not unmoved, f"{name}: LoRA B did not move off its zero init: {unmoved}"
        before, after = base_weights(fresh[name]), base_weights(trained)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name}: a base weight changed"
    assert not any(".lora_" in n for n, _ in result.components["text_encoder_2"].named_parameters())


def test_sdxl_lora_writes_metrics_samples_and_a_loadable_file(sdxl_lora_run):
    base, cfg, result = sdxl_lora_run
    records = read_metrics(Path(cfg.saving.output_dir) / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["lr"] == pytest.approx(cfg.optimizer.lr) for r in records if "loss" in r)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3]
    # at_start: the base model's image first, then the trained one's (same prompt and seed, so they differ by training)
    assert [p.name for p in result.samples] == ["step000000_00.png", "step000003_00.png"]
    before, after = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in result.samples)
    assert np.abs(before - after).max() > 0

    (lora_file,) = result.saved
    assert lora_file == Path(cfg.saving.output_dir) / "run.safetensors"
    # diffusers' own loader takes the kohya file and reproduces the trained UNet's prediction
    family = get_family("sdxl")
    pipe = family.pipeline_class.from_pretrained(str(base))
    pipe.load_lora_weights(str(lora_file))
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    with torch.no_grad():
        text = family.encode_text(result.components, ["a zxq star"])
        reloaded_text = family.encode_text(pipe.components, ["a zxq star"])
        torch.testing.assert_close(reloaded_text["encoder_hidden_states"], text["encoder_hidden_states"], rtol=1e-4, atol=1e-4)
        cond = family.conditioning({"target_size": (64, 64)}, text, torch.device("cpu"), torch.float32)
        trained = family.predict(result.components["unet"].eval(), latents, t, text, cond)
        loaded = family.predict(pipe.unet, latents, t, text, cond)
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-4)


def test_validation_loss_is_reproducible_and_v_prediction_dora_trains(tmp_path_factory, data_dirs):
    base = tiny_pipeline_dir("sd15", tmp_path_factory)
    runs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"sd15_v{i}")
        cfg = make_config(
            "sd15", base, data_dirs, out, training={"prediction_type": "v_prediction"},
            lora={"rank": 4, "dora": True, "force_dora_with_spectral": True},
        )  # fmt: skip
        runs.append(train(cfg, show_progress=False))
    first, second = runs
    assert [v for _, v in first.val_losses] == [v for _, v in second.val_losses]
    assert first.val_losses[0][1] != first.val_losses[-1][1]  # training moved the model
    lora_a = [(n, p) for n, p in first.components["unet"].named_parameters() if ".lora_A." in n]
    other = dict(second.components["unet"].named_parameters())
    assert all(torch.equal(p, other[n]) for n, p in lora_a)
    magnitudes = [p for n, p in first.components["unet"].named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(p.requires_grad for p in magnitudes)
    assert json.loads((Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 0


def test_sdxl_finetune_saves_a_diffusers_folder(tmp_path_factory, data_dirs):
    base = tiny_pipeline_dir("sdxl", tmp_path_factory)
    out = tmp_path_factory.mktemp("sdxl_ft")
    cfg = make_config(
        "sdxl", base, data_dirs, out, method="finetune",
        training={"prediction_type": "v_prediction", "max_grad_norm": 0.5, "gradient_checkpointing": True},
        schedule={"max_steps": 2}, validation={"every_n_steps": 0, "folder": None}, saving={"save_every_n_steps": 1},
        optimizer={"type": "adamw", "lr": 1e-4}, logging={"tensorboard": True},
    )  # fmt: skip
    result = train(cfg, show_progress=False)
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert result.components["unet"].is_gradient_checkpointing
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in result.saved] == ["run-step000001", "run"]
    family = get_family("sdxl")
    fresh, saved = family.load(base), family.load(out / "run")
    trained = result.components["unet"].state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in saved["unet"].state_dict().items())
    assert any(not torch.equal(v, trained[k]) for k, v in fresh["unet"].state_dict().items())
    for name in ("vae", "text_encoder", "text_encoder_2"):
        fresh_sd = fresh[name].state_dict()
        assert all(torch.equal(v, fresh_sd[k]) for k, v in saved[name].state_dict().items()), f"{name} changed"


def test_bench_train_smoke(tmp_path_factory, data_dirs):
    """The benchmark's code path on the tiny SDXL (two timed steps; no timing asserted)."""
    from lab.train_bench import run_benchmark

    base = tiny_pipeline_dir("sdxl", tmp_path_factory)
    cfg = make_config("sdxl", base, data_dirs, tmp_path_factory.mktemp("bench"), validation={"every_n_steps": 0})
    result = run_benchmark(cfg, steps=2, rounds=1, warmup=1)
    assert result["ours_steps_per_s"] > 0 and result["reference_steps_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours_steps_per_s"] / result["reference_steps_per_s"])
    json.dumps(result)
