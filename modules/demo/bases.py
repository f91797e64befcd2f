"""The demo's base preparers, found by the trainer through the ``tuneonce.base_preparers`` entry points
(pyproject.toml): the trainer asks for the one named like ``model.base_model``'s folder and never names the demo.

Each takes the base folder and returns True when it prepared (or found fresh) the demo's base there, with its concept
datasets beside it; False when a folder of that name exists without the demo's marker file: someone's own model,
left alone for the trainer's usual checks.
"""
from __future__ import annotations

from pathlib import Path

from tuneonce.demo.flux import prepare_flux_demo_base
from tuneonce.demo.prepare import MARKER_NAME, prepare_demo_base


def _ours(base: Path) -> bool:
    return not base.exists() or (base / MARKER_NAME).is_file()


def prepare_sdxl_base(base: Path) -> bool:
    """workspace/demo/tiny_sdxl_base: the demo's base (v2)."""
    if _ours(base):
        prepare_demo_base(base.parent)
        return True
    return False


def prepare_sdxl_base_v1(base: Path) -> bool:
    """workspace/demo/tiny_sdxl_base_v1: base v1 (its UNet before the second pretraining stage)."""
    if _ours(base):
        prepare_demo_base(base.parent, unet=None)
        return True
    return False


def prepare_flux_base(base: Path) -> bool:
    """workspace/demo/tiny_flux_base: the Flux demo's base, beside the SDXL demo's."""
    if _ours(base):
        prepare_flux_demo_base(base.parent)
        return True
    return False
