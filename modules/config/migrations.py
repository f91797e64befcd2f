"""Version migrations: each step turns a raw config dict of version n into version n + 1.

Migrations run per YAML file, on the raw dict, before files are merged and validated, so a
base preset written for an old version still works under a new child preset. A file without
``config_version`` is taken to be current.

History
  1  first layout: ``optimizer.name`` / ``optimizer.learning_rate``; the LR schedule lived in
     ``training`` (``lr_scheduler``, ``lr_warmup_steps``, ``max_steps``, ``epochs``); data
     folders could be plain path strings.
  2  ``optimizer.type`` / ``optimizer.lr``; a ``schedule`` section; folders are ``{path, repeats}``.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

from tuneonce.config.schema import CONFIG_VERSION


class MigrationError(ValueError):
    """A config cannot be migrated; the message names the dotted key."""


def _move(d: dict, src: str, dst: str) -> None:
    """Move a dotted key to another dotted key; both present is an error (which one would win?)."""
    *src_parents, src_leaf = src.split(".")
    node = d
    for part in src_parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    if src_leaf not in node:
        return
    value = node.pop(src_leaf)
    *dst_parents, dst_leaf = dst.split(".")
    target = d
    for part in dst_parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise MigrationError(f"{'.'.join(dst_parents)}: expected a mapping while moving {src} to {dst}")
    if dst_leaf in target:
        raise MigrationError(f"{src}: the old key and its replacement {dst} are both set; keep only {dst}")
    target[dst_leaf] = value


def _v1_to_v2(d: dict) -> dict:
    """optimizer.name → type, optimizer.learning_rate → lr; training.lr_scheduler / lr_warmup_steps / max_steps /
    epochs → the schedule section (scheduler, warmup_steps, max_steps, epochs); data.folders path strings →
    {path: ...} items."""
    _move(d, "optimizer.name", "optimizer.type")
    _move(d, "optimizer.learning_rate", "optimizer.lr")
    _move(d, "training.lr_scheduler", "schedule.scheduler")
    _move(d, "training.lr_warmup_steps", "schedule.warmup_steps")
    _move(d, "training.max_steps", "schedule.max_steps")
    _move(d, "training.epochs", "schedule.epochs")
    data = d.get("data")
    if isinstance(data, dict) and isinstance(data.get("folders"), list):
        data["folders"] = [{"path": f} if isinstance(f, str) else f for f in data["folders"]]
    return d


# MIGRATIONS[n] migrates version n to n + 1.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2}


def migrate(raw: dict) -> dict:
    """Return a copy of ``raw`` migrated to CONFIG_VERSION (with config_version set to it)."""
    d = copy.deepcopy(raw)
    version = d.get("config_version", CONFIG_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise MigrationError(f"config_version: must be an integer, got {version!r}")
    if version < 1:
        raise MigrationError(f"config_version: must be >= 1, got {version}")
    if version > CONFIG_VERSION:
        raise MigrationError(
            f"config_version: {version} is newer than this tuneonce understands ({CONFIG_VERSION}); update tuneonce"
        )
    while version < CONFIG_VERSION:
        d = MIGRATIONS[version](d)
        version += 1
    d["config_version"] = CONFIG_VERSION
    return d
