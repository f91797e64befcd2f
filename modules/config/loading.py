"""YAML files -> one validated TrainConfig, with errors that fit on one line.

Order: read the file; resolve ``base:`` (relative to the file naming it, recursive, each file
migrated to the current version on its own, then deep-merged: mappings merge, everything else
is replaced); apply ``--set a.b=c`` overrides (values parsed as YAML); validate. Every failure
is a ``ConfigError`` whose text names the file (or ``--set``), the dotted key and, for an
unknown key, the closest valid one.
"""
from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneonce.config.introspect import all_field_paths, resolve_loc
from tuneonce.config.migrations import MigrationError, migrate
from tuneonce.config.schema import CONFIG_VERSION, RuleViolation, TrainConfig

OVERRIDE_SOURCE = "--set"


class ConfigError(ValueError):
    """A config problem, reported as ``source: key: message`` on one line."""

    def __init__(self, message: str, source: str | None = None, key: str | None = None) -> None:
        self.message = message
        self.source = source
        self.key = key
        super().__init__(": ".join(p for p in (source, key, message) if p))


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict:
    """One YAML file as a dict (an empty file is ``{}``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", source=str(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=str(path)) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", source=where) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of sections, got {type(data).__name__}", source=str(path))
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _dotted_keys(d: Any, prefix: str = "") -> Iterable[str]:
    """Dotted keys of a nested dict, sections included (``a``, ``a.b``, ...)."""
    if isinstance(d, dict):
        for key, value in d.items():
            dotted = f"{prefix}{key}"
            yield dotted
            yield from _dotted_keys(value, dotted + ".")


def load_layers(path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """The merged, migrated dict of ``path`` and its bases, and which file set each dotted key."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise ConfigError(f"base files form a cycle: {cycle}", source=str(path), key="base")
    raw = read_yaml(path)
    bases = raw.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"must be a file name or a list of file names, got {bases!r}", source=str(path), key="base")
    try:
        own = migrate(raw)
    except MigrationError as e:
        raise ConfigError(str(e), source=str(path)) from None

    merged: dict = {}
    origin: dict[str, str] = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"base file {base!r} not found (looked for {base_path})", source=str(path), key="base")
        base_dict, base_origin = load_layers(base_path, (*_chain, resolved))
        merged = deep_merge(merged, base_dict)
        origin.update(base_origin)
    merged = deep_merge(merged, own)
    origin.update({key: str(path) for key in _dotted_keys(raw)})
    return merged, origin


# --------------------------------------------------------------------------- --set overrides

_KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=c"`` -> ``("a.b", yaml-parsed c)``; an empty value is null."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.match(key):
        raise ConfigError(f"expected KEY=VALUE with a dotted key (e.g. optimizer.lr=2e-3), got {text!r}",
                          source=OVERRIDE_SOURCE)
    try:
        return key, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"value is not valid YAML: {value!r} ({getattr(e, 'problem', e)})",
                          source=OVERRIDE_SOURCE, key=key) from None


def apply_override(d: dict, key: str, value: Any) -> None:
    """Set a dotted key in place, creating mappings on the way; integer parts index lists."""
    parts = key.split(".")
    node: Any = d
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{here!r} indexes a list of {len(node)} items", source=OVERRIDE_SOURCE, key=key)
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            parent = ".".join(parts[:i])
            raise ConfigError(f"{parent!r} is a value ({node!r}), not a section", source=OVERRIDE_SOURCE, key=key)


# --------------------------------------------------------------------------- validation errors


def _closest(word: str, options: Sequence[str]) -> str | None:
    """The most similar option, or the only one that starts with ``word`` (``polar`` -> ``polar_express``)."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    if match:
        return match[0]
    prefixed = [o for o in options if word and o.startswith(word)]
    return prefixed[0] if len(prefixed) == 1 else None


def _unknown_key_hint(parent_cls: type[BaseModel] | None, parent_key: str, name: str) -> str:
    if parent_cls is not None:
        near = _closest(name, list(parent_cls.model_fields))
        if near:
            return f" (did you mean {'.'.join(filter(None, (parent_key, near)))!r}?)"
    # The key may belong to another section: e.g. training.lr -> optimizer.lr.
    leaves = {path: path.rsplit(".", 1)[-1] for path in all_field_paths()}
    leaf = name if name in leaves.values() else _closest(name, sorted(set(leaves.values())))
    elsewhere = [path for path, last in leaves.items() if last == leaf]
    return f" (did you mean {elsewhere[0]!r}?)" if elsewhere else ""


def _describe(err: dict) -> tuple[str, str]:
    """(dotted_key, message) of one pydantic error entry."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    dotted, parent_cls = resolve_loc(err["loc"])
    if kind == "extra_forbidden":
        parent_key, _, name = dotted.rpartition(".")
        return dotted, f"unknown key{_unknown_key_hint(parent_cls, parent_key, name)}"
    if kind == "missing":
        return dotted, "required key is missing"
    value = err.get("input")
    message = err["msg"]
    if kind.startswith("value_error") and message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if kind in ("literal_error", "enum") and isinstance(value, str):
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        near = _closest(value, options)
        hint = f" (did you mean {near!r}?)" if near else ""
        return dotted, f"{message}, got {value!r}{hint}"
    if not isinstance(value, (dict, list)) and kind != "value_error":
        message = f"{message}, got {value!r}"
    return dotted, message


def _is_type_mismatch(err: dict) -> bool:
    return err["type"].endswith("_type")  # int_type, list_type, model_type, ...


def validation_problems(error: ValidationError) -> list[tuple[str, str]]:
    """Every problem of a ValidationError as (dotted_key, message), union noise folded."""
    by_key: dict[str, list[tuple[dict, tuple[str, str]]]] = {}
    for err in error.errors():
        exc = (err.get("ctx") or {}).get("error")
        if isinstance(exc, RuleViolation):
            for key, msg in exc.problems:
                by_key.setdefault(key, []).append((err, (key, msg)))
            continue
        key, msg = _describe(err)
        by_key.setdefault(key, []).append((err, (key, msg)))
    problems: list[tuple[str, str]] = []
    for key, entries in by_key.items():
        # A union member that got further (a deeper key) explains the problem better.
        deeper = any(k.startswith(key + ".") for k in by_key)
        if deeper and all(_is_type_mismatch(e) or e["type"] == "literal_error" for e, _ in entries):
            continue
        # A union reports one error per member; keep the specific ones over "wrong type" ones.
        specific = [p for e, p in entries if not _is_type_mismatch(e)]
        if specific:
            problems.extend(dict.fromkeys(specific))
        elif len(entries) > 1:
            expected = " or ".join(e["type"].removesuffix("_type") for e, _ in entries)
            problems.append((key, f"expected {expected}, got {entries[0][0].get('input')!r}"))
        else:
            problems.append(entries[0][1])
    return problems


def validate_dict(d: dict) -> list[tuple[str, str]]:
    """All problems of a config dict as (dotted_key, message); ``[]`` when it is valid."""
    try:
        migrated = migrate(d)
    except MigrationError as e:
        key, _, msg = str(e).partition(": ")
        return [(key, msg)]
    try:
        TrainConfig.model_validate(migrated)
    except ValidationError as e:
        return validation_problems(e)
    return []


def _source_of(key: str, origin: dict[str, str], default: str) -> str:
    """The file that set ``key`` (or its nearest parent section, or a child of it)."""
    probe = key
    while probe:
        if probe in origin:
            return origin[probe]
        probe = probe.rpartition(".")[0]
    for k, src in origin.items():
        if k.startswith(key + "."):
            return src
    return default


# --------------------------------------------------------------------------- public entry points


def resolve_config_dict(path: str | Path, overrides: Iterable[str] = ()) -> tuple[dict, dict[str, str]]:
    """The merged dict (bases, migrations, overrides applied; not yet validated) and key origins."""
    merged, origin = load_layers(path)
    for text in overrides:
        key, value = parse_override(text)
        if key == "config_version":  # a file's version says which migrations its keys need; an override has none
            raise ConfigError("cannot be overridden: it belongs to the file (which migrations its "
                              "keys need); edit the file instead", source=OVERRIDE_SOURCE, key=key)
        apply_override(merged, key, value)
        origin[key] = OVERRIDE_SOURCE
        for sub in _dotted_keys(value, key + "."):
            origin[sub] = OVERRIDE_SOURCE
    merged["config_version"] = CONFIG_VERSION
    return merged, origin


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Load, merge, override and validate a training config; raises ConfigError on the first problem."""
    merged, origin = resolve_config_dict(path, overrides)
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as e:
        problems = validation_problems(e)
        key, message = problems[0]
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
        raise ConfigError(message, source=_source_of(key, origin, str(path)), key=key) from e


def config_to_dict(cfg: TrainConfig, exclude_defaults: bool = False) -> dict:
    """Plain YAML-ready dict of a config; ``exclude_defaults`` keeps only what differs from defaults."""
    d = cfg.model_dump(mode="json", exclude_defaults=exclude_defaults)
    return {"config_version": cfg.config_version, **d}


def dump_config(cfg: TrainConfig, exclude_defaults: bool = False) -> str:
    """The config as YAML text that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg, exclude_defaults), sort_keys=False, allow_unicode=True)


def save_config(cfg: TrainConfig, path: str | Path, exclude_defaults: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg, exclude_defaults), encoding="utf-8")
    return path


__all__ = [
    "ConfigError", "load_config", "resolve_config_dict", "validate_dict", "validation_problems",
    "dump_config", "save_config", "config_to_dict", "read_yaml", "deep_merge", "parse_override",
    "apply_override",
]  # fmt: skip
