"""Weights & Biases as an optional metrics sink beside TensorBoard and metrics.jsonl (logging.wandb).

wandb is an optional dependency (the `wandb` extra), imported only when enabled. Offline mode writes the run under
`<log_dir>/wandb/offline-run-*` with no account and no network; `wandb sync <that folder>` uploads it later.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install -c requirements/lock.txt -e '.[wandb]'"


class WandbSink:
    """One W&B run: scalars with `log`, sample images with `log_images`, `close` finishes the run."""

    def __init__(self, *, project: str, mode: str, log_dir: str | Path, config: Mapping[str, Any] | None = None,
                 name: str | None = None) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ValueError(f"logging.wandb.enabled: the wandb package is not installed ({INSTALL_HINT})") from err
        if mode not in ("offline", "online"):
            raise ValueError(f"logging.wandb.mode: expected offline or online, got {mode!r}")
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        try:
            self.run = wandb.init(
                project=project, mode=mode, dir=str(folder), name=name, config=dict(config or {}),
                settings=wandb.Settings(console="off"),
            )  # fmt: skip
        except Exception as err:  # wandb raises its own types (login, network); report one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"logging.wandb: cannot start a {mode} run of project {project!r}: {first}") from err

    @property
    def run_dir(self) -> Path:
        """The run's folder (offline: <log_dir>/wandb/offline-run-<time>-<id>)."""
        return Path(self.run.dir).parent

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_images(self, step: int, paths: Sequence[Path], captions: Sequence[str] | None = None) -> None:
        """Sample images, one key per prompt index (samples/00, samples/01, ...) so each prompt has its own panel."""
        if not paths:
            return
        images = {}
        for i, path in enumerate(paths):
            index = Path(path).stem.rsplit("_", 1)[-1]
            caption = captions[i] if captions is not None and i < len(captions) else None
            images[f"samples/{index}"] = self._wandb.Image(str(path), caption=caption)
        self.run.log(images, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
