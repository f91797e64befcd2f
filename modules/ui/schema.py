"""The page's view of the typed config: sections and fields generated from the pydantic schema.

Nothing here names a config field: a field added to the config appears on the page with its
type, choices, bounds, default and description. Validation goes through the config package's
own code (the same the CLI runs), and "greyed-out" choices are found by asking that same
validation what each alternative value would do.
"""
from __future__ import annotations

import enum
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types
from pydantic import BaseModel

# -- schema -------------------------------------------------------------------------------------

def describe_model(model: type[BaseModel], prefix: str = "") -> dict:
    """A section: its own scalar fields, then one nested section per sub-model field."""
    fields: list[dict] = []
    sections: list[dict] = []
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        key = f"{prefix}{name}"
        annotation, nullable = _strip_optional(info.annotation)
        description = (info.description or "").strip()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sub = describe_model(annotation, prefix=key + ".")
            sub.update(key=key, title=_title(name), description=description or _doc(annotation))
            sections.append(sub)
            continue
        field = {
            "key": key,
            "name": name,
            "label": info.title or _title(name),
            "description": description,
            "nullable": nullable,
            "required": info.is_required(),
            "default": _jsonable_default(info),
            **_kind(annotation),
            **_bounds(info.metadata),
        }
        fields.append(field)
    return {"key": prefix.rstrip("."), "title": "", "description": _doc(model), "fields": fields, "sections": sections}


def describe_config(model: type[BaseModel]) -> dict:
    """Top-level: loose scalar fields go to a "general" section shown first."""
    root = describe_model(model)
    sections = root["sections"]
    if root["fields"]:
        general = {"key": "", "title": "General", "description": root["description"], "fields": root["fields"],
                   "sections": []}
        sections = [general, *sections]
    return {"title": model.__name__, "description": root["description"], "sections": sections}


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    annotation = _unwrap_annotated(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return _unwrap_annotated(args[0]), nullable
        return annotation, nullable
    return annotation, False


def _unwrap_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _kind(annotation: Any) -> dict:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return {"kind": "enum", "choices": [_plain(a) for a in typing.get_args(annotation)]}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"kind": "enum", "choices": [m.value for m in annotation]}
    if annotation is bool:
        return {"kind": "bool"}
    if annotation is int:
        return {"kind": "int"}
    if annotation is float:
        return {"kind": "float"}
    if annotation is str or (isinstance(annotation, type) and issubclass(annotation, Path)):
        return {"kind": "str"}
    # Anything richer is edited as YAML text: lists and unions on one line (flow style),
    # lists of sections and mappings as a block.
    args = [_unwrap_annotated(a) for a in typing.get_args(annotation)]
    multiline = origin is dict or any(isinstance(a, type) and issubclass(a, BaseModel) for a in args)
    return {"kind": "yaml", "multiline": multiline}


def _bounds(metadata: list) -> dict:
    bounds: dict = {}
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            bounds["min"] = item.ge
        elif isinstance(item, annotated_types.Gt):
            bounds["min"], bounds["exclusive_min"] = item.gt, True
        elif isinstance(item, annotated_types.Le):
            bounds["max"] = item.le
        elif isinstance(item, annotated_types.Lt):
            bounds["max"], bounds["exclusive_max"] = item.lt, True
    return {k: _plain(v) for k, v in bounds.items()}


def _jsonable_default(info) -> Any:
    if info.is_required():
        return None
    try:
        value = info.get_default(call_default_factory=True)
    except TypeError:  # factories that need the validated data
        return None
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _title(name: str) -> str:
    return name.replace("_", " ").strip().capitalize()


def _doc(model: type) -> str:
    doc = (model.__doc__ or "").strip()
    if doc.startswith(("Usage docs:", "A base class")):  # pydantic's own BaseModel docstring
        return ""
    return doc.split("\n\n")[0].replace("\n", " ")


# -- values -------------------------------------------------------------------------------------

def get_path(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_path(config: dict, key: str, value: Any) -> dict:
    """A copy of `config` with one dotted key replaced (the sections on the way are copied too)."""
    head, _, rest = key.partition(".")
    out = dict(config)
    if rest:
        out[head] = set_path(out.get(head) if isinstance(out.get(head), dict) else {}, rest, value)
    else:
        out[head] = value
    return out


def iter_fields(schema: dict):
    for section in schema["sections"]:
        yield from _iter_section(section)


def _iter_section(section: dict):
    yield from section["fields"]
    for sub in section["sections"]:
        yield from _iter_section(sub)


def blocked_choices(config: dict, schema: dict, validate) -> dict[str, dict[str, str]]:
    """For every switch and choice: the values the config would reject from here, with the reason.

    Only errors that the alternative value *adds* count, so an unrelated mistake elsewhere in the
    form does not grey out every switch.
    """
    before = {tuple(e) for e in validate(config)}
    blocked: dict[str, dict[str, str]] = {}
    for field in iter_fields(schema):
        key = field["key"]
        current = get_path(config, key)
        if field["kind"] == "bool":
            alternatives = [not bool(current)]
        elif field["kind"] == "enum":
            alternatives = [c for c in field["choices"] if c != current]
        else:
            continue
        for value in alternatives:
            added = [e for e in validate(set_path(config, key, value)) if tuple(e) not in before]
            if added:
                reason = "; ".join(f"{k}: {m}" if k and k != key else m for k, m in added[:2])
                blocked.setdefault(key, {})[_choice_key(value)] = reason
    return blocked


def _choice_key(value: Any) -> str:
    """JSON object keys are strings; the page looks up booleans as "true"/"false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
