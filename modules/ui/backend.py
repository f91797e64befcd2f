"""What the GUI's endpoints do, as plain functions over config dicts (the HTTP layer only routes).

The page holds the config as a nested dict. Fields that are not plain scalars (lists, mappings,
unions such as `lora.targets`) travel as YAML text in `texts` and are parsed here, so a typo there
is reported on that field like any other validation error.
"""
from __future__ import annotations

import copy
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tuneonce.config import schema as config_schema
from tuneonce.config.loading import dump_config
from tuneonce.trainer.layout import RunPaths
from tuneonce.trainer.metrics import METRICS_FILE
from tuneonce.ui import schema as ui_schema
from tuneonce import paths
from tuneonce.ui.runs import RunManager, RunWatch

PRESET_SUFFIXES = (".yaml", ".yml")
USER_PREFIX = "user/"  # how the preset list names the files of the user presets folder


class UserError(ValueError):
    """Bad input from the page: answered with HTTP 400 and shown to the user as is."""


class Forbidden(UserError):
    """A write the GUI never does (outside its folders, onto a shipped preset): HTTP 403."""


class FileExists(UserError):
    """Save onto an existing file without the overwrite flag: HTTP 409; the page asks, then resends."""


class Backend:
    def __init__(self, presets_dir: Path | None = None, workdir: Path | None = None,
                 runs: RunManager | None = None, user_presets_dir: Path | None = None,
                 output_root: Path | None = None) -> None:
        self.workdir = (workdir or Path.cwd()).resolve()  # config paths resolve against it, as in the CLI
        self.presets_dir = (presets_dir or paths.presets_dir()).resolve()
        # Save writes only here: never into the shipped presets (an update would overwrite, or be blocked by, them)
        default_user = self.presets_dir / "user" if presets_dir else paths.user_presets_dir()  # never site-packages
        self.user_presets_dir = (user_presets_dir or default_user).resolve()
        if self.user_presets_dir == self.presets_dir or self.user_presets_dir in self.presets_dir.parents:
            raise ValueError(f"the user presets folder {self.user_presets_dir} must not hold the shipped presets "
                             f"folder {self.presets_dir}: give it its own folder")
        # a run started from the page writes only below this folder (output, logs, caches)
        self.output_root = (output_root or self.workdir).resolve()
        self.runs = runs or RunManager(cwd=self.workdir)
        self._schema: dict | None = None

    # -- schema and presets -----------------------------------------------------------------
    def schema(self) -> dict:
        if self._schema is None:
            self._schema = ui_schema.describe_config(config_schema.TrainConfig)
        return self._schema

    def list_presets(self) -> list[str]:
        """Shipped presets by their path in the presets folder, then the user's as `user/<name>`."""
        shipped = sorted(p.relative_to(self.presets_dir).as_posix() for p in _preset_files(self.presets_dir)
                         if self.user_presets_dir not in p.parents)
        return shipped + sorted(USER_PREFIX + p.relative_to(self.user_presets_dir).as_posix()
                                for p in _preset_files(self.user_presets_dir))

    def open_preset(self, name: str) -> dict:
        user = name.startswith(USER_PREFIX)
        root = self.user_presets_dir if user else self.presets_dir
        path = (root / name.removeprefix(USER_PREFIX)).resolve()
        if root not in path.parents or not path.is_file():
            raise UserError(f"no preset named {name!r} in {root}")
        config = _load(path, self.schema())
        save_name = path.name if user else f"my_{path.stem}.yaml"  # a user preset is saved back over itself
        return {"name": name, "path": str(path), "save_path": save_name, "save_dir": str(self.user_presets_dir),
                "config": config, "texts": self.texts_for(config), **self.check(config)}

    def texts_for(self, config: dict) -> dict[str, str]:
        """YAML text of every field the page edits as text."""
        return {f["key"]: _to_yaml_text(ui_schema.get_path(config, f["key"]), f.get("multiline", False))
                for f in ui_schema.iter_fields(self.schema()) if f["kind"] == "yaml"}

    # -- validation -------------------------------------------------------------------------
    def merge_texts(self, config: dict, texts: dict[str, str]) -> tuple[dict, list[tuple[str, str]]]:
        errors = []
        for key, text in (texts or {}).items():
            try:
                value = yaml.safe_load(text) if str(text).strip() else None
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                errors.append((key, f"not valid YAML: {problem}"))
                continue
            config = ui_schema.set_path(config, key, value)
        return config, errors

    def validate(self, config: dict) -> list[tuple[str, str]]:
        return validate_dict(config)

    def check(self, config: dict, texts: dict | None = None) -> dict:
        """Errors per field, the switch values the config would reject from here, warnings, depth."""
        config, text_errors = self.merge_texts(config, texts or {})
        errors = text_errors + self.validate(config)
        blocked = ui_schema.blocked_choices(config, self.schema(), self.validate)
        return {"errors": [{"key": k, "message": m} for k, m in errors], "blocked": blocked,
                "warnings": warnings_for(config) if not errors else []}

    # -- saving and running -----------------------------------------------------------------
    def resolve_output(self, name: str) -> Path:
        """The file `name` names in the user presets folder; Forbidden/UserError for anything else.

        A plain file name only: no folders, no absolute paths, no `..`, and nothing that resolves
        (through a symlink) outside the folder or onto a shipped preset.
        """
        name = name.strip()
        if not name:
            raise UserError(f"give a file name to save to (e.g. my_run.yaml, saved in {self.user_presets_dir})")
        if "/" in name or "\\" in name or name in (".", "..") or name.startswith(("~", ".")):
            raise UserError(f"save name must be a plain file name (saved in {self.user_presets_dir}), got {name!r}")
        if Path(name).suffix not in PRESET_SUFFIXES:
            raise UserError(f"save name must end in .yaml or .yml, got {name!r}")
        target = (self.user_presets_dir / name).resolve()
        # The shipped presets are safe by construction: the user folder never holds the shipped folder
        # (checked in __init__), and a name that resolves anywhere but straight into the user folder is refused.
        if target.parent != self.user_presets_dir:
            raise Forbidden(f"{name!r} resolves to {target}, outside the user presets folder {self.user_presets_dir}")
        return target

    def valid_config(self, config: dict, texts: dict | None) -> config_schema.TrainConfig:
        """The validated config, or UserError naming the first problem (as the CLI would)."""
        config, errors = self.merge_texts(config, texts or {})
        errors = errors or self.validate(config)
        if errors:
            key, message = errors[0]
            raise UserError(f"{key}: {message}" if key else message)
        return config_schema.TrainConfig.model_validate(config)

    def save(self, config: dict, path: str, texts: dict | None = None, overwrite: bool = False) -> dict:
        """Every field written out (no `base:`), by the config package's own dumper, into the user presets
        folder; an existing file is replaced only with `overwrite` (the page asks the user first)."""
        target = self.resolve_output(path)
        text = dump_config(self.valid_config(config, texts))
        if target.exists() and not overwrite:
            raise FileExists(f"{target.name} already exists in {self.user_presets_dir}")
        self.user_presets_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, text, overwrite=overwrite)
        return {"path": str(target), "name": USER_PREFIX + target.name,
                "command": f"python scripts/train.py --config {target}"}

    def check_run_paths(self, valid: config_schema.TrainConfig) -> None:
        """UserError unless every folder the run writes to lies below the output root."""
        output_dir, log_dir, _ = run_paths(valid)
        cache = valid.data.cache_dir
        for key, value in (("saving.output_dir", output_dir), ("logging.log_dir", log_dir),
                           ("data.cache_dir", cache)):
            if value is None:
                continue
            resolved = (self.workdir / value).resolve()
            if resolved != self.output_root and self.output_root not in resolved.parents:
                raise UserError(f"{key}: {str(value)!r} is outside {self.output_root}, the only folder runs "
                                "started from the GUI write to (start it with --output-root to choose another)")

    def start_run(self, config: dict, texts: dict | None = None) -> dict:
        valid = self.valid_config(config, texts)
        self.check_run_paths(valid)
        output_dir, log_dir, samples_dir = (self.workdir / p for p in run_paths(valid))
        output_dir.mkdir(parents=True, exist_ok=True)
        config_path = output_dir / f"{valid.saving.name}.ui-run.yaml"
        write_text_atomic(config_path, dump_config(valid))
        watch = RunWatch(metrics_path=log_dir / METRICS_FILE, samples_dir=samples_dir)
        try:
            run = self.runs.start(config_path, watch, max_steps=valid.schedule.max_steps)
        except RuntimeError as exc:
            raise UserError(str(exc)) from None
        return {"config_path": str(config_path), "command": run.command, "started_at": time.time()}

    # -- depth ------------------------------------------------------------------------------
    def warm_up_in_background(self) -> threading.Thread:
        """Import the depth code (diffusers, transformers: seconds) while the user looks at the page."""
        from tuneonce.ui.depth_info import warm_up

        thread = threading.Thread(target=warm_up, name="tuneonce-ui-warm-up", daemon=True)
        thread.start()
        return thread

    def depth(self, config: dict, texts: dict | None = None) -> dict:
        from tuneonce.ui.depth_info import depth_report

        config, _errors = self.merge_texts(config, texts or {})
        return depth_report(config, self.workdir)

    def memory(self, config: dict, texts: dict | None = None) -> dict:
        """The planner's predicted peak of this config and, with memory.budget_gb, what a run would pick."""
        from tuneonce.ui.memory_info import memory_report

        config, errors = self.merge_texts(config, texts or {})
        return {"error": "the memory plan needs a valid config"} if errors else memory_report(config, self.workdir)


def write_text_atomic(path: Path, text: str, overwrite: bool = True) -> None:
    """Write via a temporary file in the same folder, then rename it into place: readers never see half a
    file. Without `overwrite` the rename is a hard link, which fails (FileExists) if the name appeared meanwhile."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp_name, path)
        else:
            try:
                os.link(tmp_name, path)
            except FileExistsError:
                raise FileExists(f"{path.name} already exists in {path.parent}") from None
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _preset_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.rglob("*") if p.suffix in PRESET_SUFFIXES and p.is_file()]


def validate_dict(config: dict) -> list[tuple[str, str]]:
    """The config package's own validation (what the CLI runs), as (dotted key, message) pairs."""
    from tuneonce.config.loading import validate_dict as validate

    return [(str(k), str(m)) for k, m in validate(copy.deepcopy(config))]


def run_paths(config: config_schema.TrainConfig) -> tuple[Path, Path, Path]:
    """(output_dir, log_dir, samples_dir) of a run (tuneonce.trainer.layout, torch-free: the first Start stays fast)."""
    paths = RunPaths.from_config(config)
    return paths.output_dir, paths.log_dir, paths.samples_dir


def warnings_for(config: dict) -> list[str]:
    warn = getattr(config_schema, "config_warnings", None)
    if warn is None:
        return []
    try:
        return list(warn(config_schema.TrainConfig.model_validate(config)))
    except Exception:  # invalid configs have errors instead
        return []


def _to_yaml_text(value: Any, multiline: bool) -> str:
    if value is None:
        return ""
    text = yaml.safe_dump(value, default_flow_style=not multiline, sort_keys=False, allow_unicode=True, width=10**6)
    text = text.strip()
    if text.endswith("\n..."):  # PyYAML's document-end marker after a lone scalar
        text = text[:-4].rstrip()
    return text


def _load(path: Path, schema: dict) -> dict:
    """A preset as the CLI reads it (bases merged, migrations applied) over the schema's defaults.

    Not validated here: a preset that is incomplete on its own (e.g. one meant as a base) still
    opens, and its problems show next to the fields.
    """
    from tuneonce.config.loading import ConfigError, deep_merge, resolve_config_dict

    try:
        merged, _origin = resolve_config_dict(path)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    defaults: dict = {}
    for field in ui_schema.iter_fields(schema):
        if field.get("required"):
            continue
        defaults = ui_schema.set_path(defaults, field["key"], copy.deepcopy(field["default"]))
    return deep_merge(defaults, merged)
