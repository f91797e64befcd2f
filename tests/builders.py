"""Builders shared by the tests that train tiny pipelines end to end through `train()`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from modules.config.schema import TrainConfig
from modules.data.synthetic import write_concept_dataset


def concept_data_dirs(root: Path, *, train_count: int) -> tuple[Path, Path]:
    """A generated concept dataset and two held-out validation images (fixed seeds)."""
    write_concept_dataset(root / "train", count=train_count, size=64, seed=1)
    write_concept_dataset(root / "val", count=2, size=64, seed=7)
    return root / "train", root / "val"


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
