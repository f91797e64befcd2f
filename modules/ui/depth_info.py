"""The depth panel: residual depth per component of the chosen model and the eps / decay that follow.

The numbers come from the depth counter (modules/model/depth.py) and the optimizer's scaling rules
(modules/optimizer/scaling.py); nothing is re-derived here. The model is the config's local
`base_model` folder when it exists (components built on the meta device from their config.json,
so no weights are read), else the published architecture of the config's family. When the depth
code is missing or fails, the panel says why instead of breaking the page.
"""
from __future__ import annotations

import json
import threading
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from tuneonce.config.families import ROWS

# config family -> built-in architecture name (modules/model/builtin.py) used when no local folder exists
FAMILY_BUILTIN = {row.name: row.builtin for row in ROWS if row.builtin is not None}
SKIPPED_COMPONENTS = ("vae", "scheduler", "tokenizer", "tokenizer_2", "tokenizer_3", "feature_extractor",
                      "image_encoder", "safety_checker")  # fmt: skip
COLUMNS = ["component", "L", "d", "ns_eps W", "ns_eps B", "AdaMuon eps", "decay/step"]
# One depth computation at a time: diffusers/transformers import lazily, and two threads importing them
# at once can see half-initialised modules.
_build_lock = threading.RLock()


def depth_report(config: dict, workdir: Path) -> dict:
    with _build_lock:
        return _depth_report(config, workdir)


def _depth_report(config: dict, workdir: Path) -> dict:
    """{"columns", "rows", "source", "notes"} for the page, or {"error": why} when it cannot be computed.

    Each row: {"component", "class", "trained", "cells": [L, d, ns_eps d×d, ns_eps B, AdaMuon eps, decay]}
    for a square d×d matrix of the component and a LoRA B factor d×r of it.
    """
    model = config.get("model") or {}
    try:
        source, pipeline, components = _components(model, workdir)
    except ImportError as exc:
        return {"error": f"depth counter not available ({exc.name or exc}); the rest of the page works"}
    except Exception as exc:  # a broken model folder must not break the form
        return {"error": f"cannot read the model: {exc}"}
    try:
        from tuneonce.model.depth import model_depths
        from tuneonce.optimizer import scaling
    except ImportError as exc:
        return {"error": f"depth counter not available ({exc.name or exc}); the rest of the page works"}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            depths = model_depths(components, pipeline=pipeline, depth_override=model.get("depth"))
    except ValueError as exc:
        return {"error": f"model.depth: {exc}"}
    opt = config.get("optimizer") or {}
    rank = int((config.get("lora") or {}).get("rank") or 16)
    trained = _trained_components(config)
    rows, notes = [], []
    for name, found in depths.items():
        width = _typical_width(name, components[name])
        L = found.depth  # "model" depth: the trained depth needs the adapters in place (see notes)
        scaled_eps = opt.get("depth_scaled_eps", True)
        rows.append({
            "component": name,
            "class": found.class_name,
            "trained": name in trained,
            "cells": [
                L,
                width,
                _fmt(scaling.ns_damping(width, width, L) if scaled_eps else opt.get("ns_eps")),
                _fmt(scaling.ns_damping(rank, width, L) if scaled_eps else opt.get("ns_eps")),
                _fmt(scaling.adamuon_eps(width, width, L) if scaled_eps else opt.get("eps")),
                _fmt(_decay(scaling, opt, width)),
            ],
        })
        if found.source != "registry":
            notes.append(f"{name}: depth from {found.source} ({' + '.join(found.counted)})")
    notes += [str(w.message) for w in caught]
    if model.get("depth_source") == "trained":
        notes.append("depth_source: trained — the run uses only the blocks holding LoRA modules; "
                     "the table shows the whole model's depth.")
    notes.append(f"W: a d×d matrix, d = the most common input width of the component's linear layers; "
                 f"B: a LoRA up factor d×r (r = lora.rank {rank}); decay/step: the fraction of W removed per step "
                 "at peak LR.")
    return {"columns": COLUMNS, "rows": rows, "source": source, "notes": notes}


def _decay(scaling, opt: dict, width: int) -> float:
    wd = float(opt.get("weight_decay") or 0.0)
    if opt.get("width_scaled_weight_decay", True):
        return scaling.width_decay(wd, width, 1.0)
    return float(opt.get("lr") or 0.0) * wd  # ordinary decoupled decay: lr·wd per step


def _trained_components(config: dict) -> set[str]:
    if config.get("method") == "finetune":
        return {"unet", "transformer"}
    flags = (config.get("lora") or {}).get("train_text_encoders") or {}
    return {"unet", "transformer"} | {name for name, on in flags.items() if on}


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    return f"{float(value):.3g}"


def _typical_width(name: str, module) -> int:
    from torch import nn

    fans = Counter(m.in_features for m in module.modules() if isinstance(m, nn.Linear))
    return fans.most_common(1)[0][0] if fans else 1


def _components(model: dict, workdir: Path) -> tuple[str, str | None, dict]:
    base = str(model.get("base_model") or "")
    folder = Path(base).expanduser()
    folder = folder if folder.is_absolute() else workdir / folder
    if base and (folder / "model_index.json").is_file():
        pipeline, components = _folder_components(str(folder.resolve()), (folder / "model_index.json").stat().st_mtime)
        return f"local folder {base}", pipeline, components
    family = model.get("family")
    builtin = FAMILY_BUILTIN.get(str(family))
    if builtin is None:
        raise ValueError(f"no local folder {base!r} and no built-in architecture for family {family!r}")
    pipeline, components = _builtin_components(builtin)
    why = "no local folder yet" if base else "no base_model set"
    return f"published {builtin} architecture ({why}: {base or '—'})", pipeline, components


def warm_up(family: str = "sdxl") -> None:
    """Import the depth code and build one built-in architecture, so the first depth request is quick."""
    try:
        with _build_lock:
            _builtin_components(FAMILY_BUILTIN.get(family, "sdxl"))
    except Exception:  # only a warm-up: the real request reports what went wrong
        pass


@lru_cache(maxsize=8)
def _builtin_components(name: str) -> tuple[str, dict]:
    from tuneonce.model.builtin import build_meta_components, get_builtin

    return get_builtin(name).pipeline, build_meta_components(name)


@lru_cache(maxsize=8)
def _folder_components(folder: str, _mtime: float) -> tuple[str | None, dict]:
    """Every trainable component of a diffusers pipeline folder, as real classes on the meta device."""
    import diffusers
    import torch
    import transformers

    index = json.loads((Path(folder) / "model_index.json").read_text())
    components = {}
    with torch.device("meta"):
        for name, spec in index.items():
            if name.startswith("_") or name in SKIPPED_COMPONENTS or not isinstance(spec, list) or None in spec:
                continue
            library, class_name = spec
            cls = getattr(diffusers if library == "diffusers" else transformers, class_name, None)
            if cls is None:
                continue
            path = Path(folder) / name
            if library == "diffusers" and issubclass(cls, diffusers.ModelMixin):
                components[name] = cls.from_config(cls.load_config(path))
            elif library == "transformers" and issubclass(cls, transformers.PreTrainedModel):
                components[name] = cls(cls.config_class.from_pretrained(path))
    if not components:
        raise ValueError(f"{folder}: model_index.json names no model components")
    return index.get("_class_name"), components
