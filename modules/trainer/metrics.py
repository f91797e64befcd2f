"""Where numbers go: a tqdm bar (loss, lr, it/s, ETA), TensorBoard, a JSONL file (one JSON object per line) and,
optionally, Weights & Biases (modules/trainer/wandb_log.py; sample images too).

The JSONL file is `<log_dir>/metrics.jsonl`; every record has "step" plus the logged scalars (e.g. "loss", "lr",
"val_loss"). A value that is not finite (NaN, inf: not JSON) is written as null and the record gets
"nonfinite": true, so every line stays valid JSON. The GUI and the LR-sweep tooling read it.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, log_dir: str | Path, *, tensorboard: bool = True, jsonl: bool = True, wandb: Any = None) -> None:
        self.log_dir = Path(log_dir)
        self.wandb = wandb  # a WandbSink, or None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.log_dir / METRICS_FILE, "a", encoding="utf-8") if jsonl else None
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported only when used: it is slow to import

            self._writer = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"))

    @property
    def jsonl_path(self) -> Path:
        return self.log_dir / METRICS_FILE

    def log(self, step: int, values: dict[str, float]) -> None:
        if self._jsonl is not None:
            record = {"step": step, "time": round(time.time(), 3), **json_values(values)}
            self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            self._jsonl.flush()
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, values)

    def log_images(self, step: int, paths: list[Path], captions: list[str] | None = None) -> None:
        """Sample images: to W&B when it is on (TensorBoard and JSONL keep scalars; the PNGs are on disk)."""
        if self.wandb is not None:
            self.wandb.log_images(step, paths, captions)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


def json_values(values: dict[str, float]) -> dict[str, object]:
    """`values` with non-finite numbers as None, plus "nonfinite": True when there was one."""
    out: dict[str, object] = {}
    for key, value in values.items():
        bad = isinstance(value, float) and not math.isfinite(value)
        out[key] = None if bad else value
        if bad:
            out["nonfinite"] = True
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_bar(total: int, initial: int = 0, disable: bool = False) -> tqdm:
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=disable)
