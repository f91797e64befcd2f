"""Where a run writes: its output, log, samples and cache folders, from the config.

No torch here: the GUI imports this to show and check a run's folders without paying the trainer's import time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RunPaths:
    output_dir: Path
    log_dir: Path
    samples_dir: Path
    cache_dir: Path

    @classmethod
    def from_config(cls, config: Any) -> RunPaths:
        out = Path(config.saving.output_dir)
        return cls(
            output_dir=out,
            log_dir=Path(config.logging.log_dir) if config.logging.log_dir else out / "logs",
            samples_dir=out / "samples",
            cache_dir=Path(config.data.cache_dir) if config.data.cache_dir else out / "cache",
        )
