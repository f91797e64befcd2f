"""Builders shared by the tests that train tiny pipelines end to end through `train()`."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import torch

from tuneonce.config.schema import TrainConfig
from tuneonce.data.synthetic import write_concept_dataset


def concept_data_dirs(root: Path, *, train_count: int) -> tuple[Path, Path]:
    """A generated concept dataset and two held-out validation images (fixed seeds)."""
    write_concept_dataset(root / "train", count=train_count, size=64, seed=1)
    write_concept_dataset(root / "val", count=2, size=64, seed=7)
    return root / "train", root / "val"


# A two-step flow-matching LoRA run (defaults for tiny_train_config).
FLOW_RUN = {
    "lora": {"rank": 4, "alpha": 2.0},  # alpha != rank: the file must carry the 0.5 scale
    "schedule": {"max_steps": 2},
    "training": {"batch_size": 2, "seed": 3, "timestep_sampling": "logit_normal"},
    "validation": {"every_n_steps": 2, "num_timesteps": 2},
    "saving": {"format": "diffusers"},
}


def tiny_train_config(family: str, base: Path, data_dirs: tuple[Path, Path], out: Path,
                      *, defaults: dict[str, dict[str, Any]] | None = None, **sections: Any) -> TrainConfig:
    """A few-step LoRA run at 64 px; `defaults` then `sections` update the config section by section (a dict
    value updates that section, anything else replaces it)."""
    train_dir, val_dir = data_dirs
    cfg: dict[str, Any] = {
        "model": {"family": family, "base_model": str(base)},
        "lora": {"rank": 4},
        "data": {"folders": [{"path": str(train_dir)}], "resolution": 64, "bucketing": False},
        "optimizer": {"type": "muon_adv"},
        "schedule": {"max_steps": 3},
        "training": {"batch_size": 2, "seed": 3},
        "validation": {"every_n_steps": 3, "folder": str(val_dir), "num_timesteps": 2},
        "saving": {"output_dir": str(out), "name": "run"},
        "logging": {"tensorboard": False},
    }
    for updates in (defaults or {}, sections):
        for section, values in updates.items():
            cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return TrainConfig.model_validate(cfg)


def flux_transformer_inputs(config: Any, seed: int = 0) -> dict[str, Any]:
    """Random forward kwargs (16 image tokens on a 4x4 grid, 8 text tokens) for a tiny Flux/Chroma transformer."""
    g = torch.Generator().manual_seed(seed)
    tokens, text = 16, 8
    kwargs: dict[str, Any] = dict(
        hidden_states=torch.randn(1, tokens, config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim, generator=g),
        timestep=torch.tensor([0.4]),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )
    if hasattr(config, "pooled_projection_dim"):
        kwargs["pooled_projections"] = torch.randn(1, config.pooled_projection_dim, generator=g)
    if getattr(config, "guidance_embeds", False):
        kwargs["guidance"] = torch.tensor([3.5])
    return kwargs


def signal_in_step(monkeypatch: Any, step: int, sig: int = signal.SIGINT) -> None:
    """Make the loop's `step`-th loss computation raise `sig` (Ctrl-C / SIGTERM mid-step) once; the monkeypatch
    undoes it at the end of the test (or earlier with monkeypatch.undo())."""
    from tuneonce.trainer import loop

    calls, real = [0], loop.compute_loss

    def signalled(parts, batch):
        calls[0] += 1
        if calls[0] == step:
            signal.raise_signal(sig)
        return real(parts, batch)

    monkeypatch.setattr(loop, "compute_loss", signalled)
