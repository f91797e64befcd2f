"""What the GUI's endpoints do, as plain functions over config dicts (the HTTP layer only routes).

The page holds the config as a nested dict. Fields that are not plain scalars (lists, mappings,
unions such as `lora.targets`) travel as YAML text in `texts` and are parsed here, so a typo there
is reported on that field like any other validation error.
"""
from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from modules.config import schema as config_schema
from modules.config.loading import dump_config
from modules.trainer.metrics import METRICS_FILE
from modules.ui import schema as ui_schema
from modules.ui.runs import REPO_ROOT, RunManager, RunWatch

PRESET_SUFFIXES = (".yaml", ".yml")


class UserError(ValueError):
    """Bad input from the page: answered with HTTP 400 and shown to the user as is."""


class Backend:
    def __init__(self, presets_dir: Path | None = None, workdir: Path | None = None,
                 runs: RunManager | None = None) -> None:
        self.workdir = (workdir or Path.cwd()).resolve()  # config paths resolve against it, as in the CLI
        self.presets_dir = (presets_dir or REPO_ROOT / "training_presets").resolve()
        self.runs = runs or RunManager(cwd=self.workdir)
        self._schema: dict | None = None

    # -- schema and presets -----------------------------------------------------------------
    def schema(self) -> dict:
        if self._schema is None:
            self._schema = ui_schema.describe_config(config_schema.TrainConfig)
        return self._schema

    def list_presets(self) -> list[str]:
        if not self.presets_dir.is_dir():
            return []
        return sorted(p.relative_to(self.presets_dir).as_posix() for p in self.presets_dir.rglob("*")
                      if p.suffix in PRESET_SUFFIXES and p.is_file())

    def open_preset(self, name: str) -> dict:
        path = (self.presets_dir / name).resolve()
        if self.presets_dir not in path.parents or not path.is_file():
            raise UserError(f"no preset named {name!r} in {self.presets_dir}")
        config = _load(path, self.schema())
        return {"name": name, "path": str(path), "save_path": self.suggest_save_path(path),
                "config": config, "texts": self.texts_for(config), **self.check(config)}

    def suggest_save_path(self, preset: Path) -> str:
        """`my_<preset>.yaml` beside the preset, relative to the working directory when it is inside it."""
        target = preset.with_name(f"my_{preset.stem}.yaml")
        try:
            return target.relative_to(self.workdir).as_posix()
        except ValueError:
            return str(target)

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
    def resolve_output(self, path: str) -> Path:
        if not path.strip():
            raise UserError("give a file name to save to (e.g. training_presets/my_run.yaml)")
        target = Path(path).expanduser()
        if not target.is_absolute():
            target = self.workdir / target
        if target.suffix not in PRESET_SUFFIXES:
            raise UserError(f"save path must end in .yaml or .yml, got {path!r}")
        return target

    def valid_config(self, config: dict, texts: dict | None) -> config_schema.TrainConfig:
        """The validated config, or UserError naming the first problem (as the CLI would)."""
        config, errors = self.merge_texts(config, texts or {})
        errors = errors or self.validate(config)
        if errors:
            key, message = errors[0]
            raise UserError(f"{key}: {message}" if key else message)
        return config_schema.TrainConfig.model_validate(config)

    def save(self, config: dict, path: str, texts: dict | None = None) -> dict:
        """Every field written out (no `base:`), by the config package's own dumper."""
        target = self.resolve_output(path)
        text = dump_config(self.valid_config(config, texts))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        return {"path": str(target), "command": f"python scripts/train.py --config {target}"}

    def start_run(self, config: dict, texts: dict | None = None) -> dict:
        valid = self.valid_config(config, texts)
        output_dir, log_dir, samples_dir = (self.workdir / p for p in run_paths(valid))
        output_dir.mkdir(parents=True, exist_ok=True)
        config_path = output_dir / f"{valid.saving.name}.ui-run.yaml"
        config_path.write_text(dump_config(valid), encoding="utf-8")
        watch = RunWatch(metrics_path=log_dir / METRICS_FILE, samples_dir=samples_dir)
        try:
            run = self.runs.start(config_path, watch, max_steps=valid.schedule.max_steps)
        except RuntimeError as exc:
            raise UserError(str(exc)) from None
        return {"config_path": str(config_path), "command": run.command, "started_at": time.time()}

    # -- depth ------------------------------------------------------------------------------
    def warm_up_in_background(self) -> threading.Thread:
        """Import the depth code (diffusers, transformers: seconds) while the user looks at the page."""
        from modules.ui.depth_info import warm_up

        thread = threading.Thread(target=warm_up, name="tuneonce-ui-warm-up", daemon=True)
        thread.start()
        return thread

    def depth(self, config: dict, texts: dict | None = None) -> dict:
        from modules.ui.depth_info import depth_report

        config, _errors = self.merge_texts(config, texts or {})
        return depth_report(config, self.workdir)


def validate_dict(config: dict) -> list[tuple[str, str]]:
    """The config package's own validation (what the CLI runs), as (dotted key, message) pairs."""
    from modules.config.loading import validate_dict as validate

    return [(str(k), str(m)) for k, m in validate(copy.deepcopy(config))]


def run_paths(config: config_schema.TrainConfig) -> tuple[Path, Path, Path]:
    """(output_dir, log_dir, samples_dir) of a run, by the rule of modules.trainer.train.RunPaths.

    Restated here because importing the trainer loads torch, which would make the first Start
    take seconds; tests/test_ui_backend.py checks that both agree.
    """
    out = Path(config.saving.output_dir)
    log_dir = Path(config.logging.log_dir) if config.logging.log_dir else out / "logs"
    return out, log_dir, out / "samples"


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
    from modules.config.loading import ConfigError, deep_merge, resolve_config_dict

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
