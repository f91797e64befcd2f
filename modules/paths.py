"""Where tuneonce finds its shipped files and writes its work files, in a checkout and in an installed wheel.

- Shipped presets and example configs: in a checkout `training_presets/` and `configs/` at the repository root; in
  a wheel the same trees under the package, `tuneonce/presets/` (pyproject maps them there, keeping their relative
  layout, so an example's `base: ../../training_presets/x.yaml` still resolves).
- Work files that are not results (the demo's prepared base and datasets, the GUI's saved presets when the package
  is installed): `$TUNEONCE_HOME` if set; else `workspace/` in a checkout (as before); else the user cache folder
  (`$XDG_CACHE_HOME/tuneonce`, default `~/.cache/tuneonce`). Never inside site-packages.
- Relative paths inside a config still resolve against the working folder, as in a shell (configs/SCHEMA.md).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_ROOT = PACKAGE_DIR.parent  # the repository root when running from a checkout (editable install)
PRESET_SUFFIXES = (".yaml", ".yml")


def in_checkout() -> bool:
    """True when the package is the checkout's modules/ folder, not an installed copy."""
    return (CHECKOUT_ROOT / "training_presets").is_dir() and (CHECKOUT_ROOT / "pyproject.toml").is_file()


def shipped_root() -> Path:
    """The folder holding `training_presets/` and `configs/`: the checkout, or the wheel's `tuneonce/presets/`."""
    return CHECKOUT_ROOT if in_checkout() else PACKAGE_DIR / "presets"


def presets_dir() -> Path:
    return shipped_root() / "training_presets"


def home() -> Path:
    """Work folder for prepared demo files and (installed) user presets; see the module docstring."""
    if os.environ.get("TUNEONCE_HOME"):
        return Path(os.environ["TUNEONCE_HOME"]).expanduser()
    if in_checkout():
        return CHECKOUT_ROOT / "workspace"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "tuneonce"


def user_presets_dir() -> Path:
    """Where the GUI saves: beside the shipped presets in a checkout (as before), else under home()."""
    return presets_dir() / "user" if in_checkout() else home() / "presets"


def preset_search_dirs() -> list[Path]:
    root = shipped_root()
    return [root / "training_presets", root / "training_presets" / "examples", root / "configs" / "examples"]


def resolve_config_path(name: str | Path) -> Path:
    """`name` itself when that file exists; else a shipped preset of that name (`demo_sdxl_lora`,
    `demo_sdxl_lora.yaml`, `examples/demo_sdxl_loha`); else `name` unchanged (the loader reports it missing)."""
    path = Path(name)
    if path.exists() or path.is_absolute():
        return path
    candidates = [path] if path.suffix in PRESET_SUFFIXES else [path.with_name(path.name + s) for s in PRESET_SUFFIXES]
    for folder in preset_search_dirs():
        for candidate in candidates:
            if (folder / candidate).is_file():
                return folder / candidate
    return path
