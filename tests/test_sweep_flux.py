"""The sweep's pretrained tiny DiT (source demo_flux): the Flux demo's transformer pretraining lowers the held-out
flow loss and is deterministic, the source builds, caches and trains through the sweep's own path, and adding the
source's ModelSpec field left the cache key of every model spec that does not set it unchanged."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import FluxPipeline

from tuneonce.demo.flux import held_out_validator, prepare_flux_demo_base, pretrain_flux_transformer
from tuneonce.demo.prepare import DemoSettings
from lab.sweep import models
from lab.sweep.runner import RESULTS_NAME, read_results, run_sweep
from lab.sweep.spec import ModelSpec, SweepError, load_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SMALL = DemoSettings(pretrain_images=32, batch_size=8)  # a few images and a small batch: a fast, real pretraining


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> Path:
    """A tiny SDXL folder standing in for the demo base (its VAE and CLIP are what the Flux demo base copies)."""
    from tuneonce.model.tiny import build_tiny_sdxl

    folder = tmp_path_factory.mktemp("sdxl") / "base"
    build_tiny_sdxl(0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory, sdxl_base: Path) -> Path:
    return prepare_flux_demo_base(tmp_path_factory.mktemp("flux"), sdxl_base=sdxl_base, pretrain=None)


def _pipe(folder: Path) -> FluxPipeline:
    return FluxPipeline.from_pretrained(folder, local_files_only=True)


def test_pretraining_lowers_the_held_out_flow_loss_and_is_deterministic(flux_base: Path) -> None:
    pipe = _pipe(flux_base)
    init = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    held_out = held_out_validator(pipe, SMALL, count=16)
    before = held_out.loss(pipe.transformer)
    losses = pretrain_flux_transformer(pipe, SMALL, steps=25, lr=3e-3)
    after = held_out.loss(pipe.transformer)
    assert after < 0.8 * before, (before, after)  # held-out draws of the domain, fixed timesteps and noise
    assert not pipe.transformer.training and not any(p.requires_grad for p in pipe.transformer.parameters())
    # Same seed, same draws: a shorter run repeats the first steps exactly (the warm-up LR does not depend on the
    # run's length), and the text encoders and VAE were not touched.
    again = _pipe(flux_base)
    assert all(torch.equal(init[k], v) for k, v in again.transformer.state_dict().items())
    assert pretrain_flux_transformer(again, SMALL, steps=3, lr=3e-3) == losses[:3]
    for name in ("vae", "text_encoder", "text_encoder_2"):
        fresh = getattr(_pipe(flux_base), name).state_dict()
        assert all(torch.equal(fresh[k], v) for k, v in getattr(pipe, name).state_dict().items()), name


def test_pretraining_rejects_bad_arguments(flux_base: Path) -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pretrain_flux_transformer(_pipe(flux_base), SMALL, steps=0)


def _sweep_file(tmp_path: Path) -> Path:
    data = {
        "name": "flux_source", "base_config": str(REPO / "training_presets" / "demo_sdxl_lora.yaml"), "steps": 2,
        "seeds": [0], "lr_points": 1, "train_images": 2, "val_images": 2,
        "overrides": {"training.batch_size": 2, "validation.every_n_steps": 2, "validation.num_timesteps": 2,
                      "sampling.every_n_steps": 0, "sampling.prompts": [], "logging.tensorboard": False,
                      "saving.format": "diffusers"},
        "base_point": {"model": "flux_pre", "rank": 2},
        "models": {"flux_pre": {"family": "flux", "source": "demo_flux", "pretrain_steps": 2, "pretrain_lr": 2e-3}},
        "optimizers": {"muon_tuned": {"lr_center": 4e-3, "overrides": {"optimizer.type": "muon_adv"}}},
        "axes": {"rank": {"varies": "rank", "values": [2], "optimizers": "all"}},
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_flux_source_builds_caches_and_trains_in_the_sweep(tmp_path: Path, sdxl_base: Path, monkeypatch) -> None:
    monkeypatch.setattr(models, "sweep_demo_base", lambda: sdxl_base)
    spec = load_sweep(_sweep_file(tmp_path))
    records = run_sweep(spec, tmp_path / "out", log=lambda _: None)
    assert len(records) == 1 and "error" not in records[0], records
    assert records[0]["val_loss"] is not None and records[0]["val_curve"][0][0] == 0
    folder = tmp_path / "out" / "models" / "flux_pre"
    marker = json.loads((folder / models.MARKER).read_text())
    assert "2 flow-matching steps at lr 0.002" in marker["weights"]
    measured = marker["held_out_flow_loss"]
    assert measured["pretrained"] < measured["init"]  # two steps of warm-up already move the transformer downhill
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"

    # Cached: a second call reuses the folder; a changed VAE in the SDXL base changes the key.
    class Rebuilt(Exception):
        pass

    def rebuild(*args):
        raise Rebuilt

    monkeypatch.setattr(models, "build_demo_flux", rebuild)
    assert models.prepare_model(spec.models["flux_pre"], tmp_path / "out" / "models") == folder
    other = tmp_path / "other_sdxl"
    for name in ("vae", "text_encoder"):
        (other / name).mkdir(parents=True)
    (other / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"other vae")
    clip = "text_encoder/model.safetensors"
    (other / clip).write_bytes((sdxl_base / clip).read_bytes())
    monkeypatch.setattr(models, "sweep_demo_base", lambda: other)
    with pytest.raises(Rebuilt):
        models.prepare_model(spec.models["flux_pre"], tmp_path / "out" / "models")


def _digest_before_pretrain_lr(spec: ModelSpec) -> str:
    """The cache key as lab.sweep.models computed it before ModelSpec had pretrain_lr (same payload, same hash)."""
    payload = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("name", "pretrain_lr")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def test_existing_model_specs_keep_their_cache_key() -> None:
    spec = load_sweep(REPO / "sweeps" / "default.yaml")
    old = [m for m in spec.models.values() if m.source != "demo_flux"]
    assert {m.name for m in old} >= {"demo_w64", "unet_w128", "unet_deep", "flux_dit"}
    for model in old:
        assert models._spec_digest(model) == _digest_before_pretrain_lr(model), model.name
    # The keys the sweep's cached models were written with before the field existed.
    assert models._spec_digest(spec.models["flux_dit"]) == "8aa9627afbd7402a"
    assert models._spec_digest(spec.models["unet_w128"]) == "9d7fec7a1b209dfe"
    # A value other than the default is part of the key, and so are the files a model is built from.
    tuned = dataclasses.replace(spec.models["unet_w128"], pretrain_lr=1e-3)
    assert models._spec_digest(tuned) != models._spec_digest(spec.models["unet_w128"])
    flux = dataclasses.replace(spec.models["flux_dit"], source="demo_flux", kind="")
    assert models._spec_digest(flux, {"vae": "a"}) != models._spec_digest(flux, {"vae": "b"})


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"family": "sdxl", "source": "demo_flux", "pretrain_steps": 10}, "set family: flux, not 'sdxl'"),
        ({"family": "flux", "source": "demo_flux", "pretrain_lr": -1.0}, "pretrain_lr: must be a number >= 0"),
        ({"family": "flux", "source": "demo_sd3", "pretrain_steps": 10}, "set family: sd3, not 'flux'"),
        ({"family": "flux", "source": "demo_flux", "width_multiplier": 0}, "width_multiplier must be > 0"),
    ],
)
def test_bad_demo_flux_models_fail_with_one_line(tmp_path: Path, model: dict, message: str) -> None:
    data = yaml.safe_load(_sweep_file(tmp_path).read_text())
    data["models"]["flux_pre"] = model
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    assert message in str(info.value) and "\n" not in str(info.value) and "models.flux_pre" in str(info.value)
