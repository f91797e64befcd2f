"""Reading the schema itself: field types, choices, defaults, descriptions, dotted paths.

Used by the loader (to name keys in errors), by the docs generator and by the GUI, so a new
field shows up everywhere without extra code.
"""
from __future__ import annotations

import types
from functools import lru_cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tuneonce.config.schema import TrainConfig

CONSTRAINTS = ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern")


def _is_union(ann: Any) -> bool:
    return get_origin(ann) in (Union, types.UnionType)


def strip_annotated(ann: Any) -> Any:
    """``Annotated[int, Field(ge=1)]`` -> ``int``."""
    return get_args(ann)[0] if get_origin(ann) is Annotated else ann


def split_optional(ann: Any) -> tuple[Any, bool]:
    """(annotation without None, whether None is allowed)."""
    ann = strip_annotated(ann)
    if _is_union(ann):
        members = [a for a in get_args(ann) if a is not type(None)]
        nullable = len(members) < len(get_args(ann))
        inner = members[0] if len(members) == 1 else Union[tuple(members)]  # noqa: UP007
        return inner, nullable
    return ann, False


def model_class(ann: Any) -> type[BaseModel] | None:
    inner, _ = split_optional(ann)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def choices(ann: Any) -> list | None:
    """The allowed values of a Literal (also inside Optional / a union with other types)."""
    inner, _ = split_optional(ann)
    members = get_args(inner) if _is_union(inner) else (inner,)
    for member in members:
        if get_origin(member) is Literal:
            return list(get_args(member))
    return None


def type_name(ann: Any) -> str:
    """A short readable name of an annotation, for docs and the GUI."""
    inner, nullable = split_optional(ann)
    if _is_union(inner):
        name = " | ".join(type_name(a) for a in get_args(inner))
    elif get_origin(inner) is Literal:
        name = " | ".join(repr(v) for v in get_args(inner))
    elif get_origin(inner) in (list, tuple, dict):
        args = ", ".join(type_name(a) for a in get_args(inner) if a is not Ellipsis)
        name = f"{get_origin(inner).__name__}[{args}]"
    elif isinstance(inner, type):
        name = inner.__name__
    else:
        name = str(inner)
    return f"{name} | null" if nullable else name


def constraints(info: FieldInfo) -> dict:
    out = {}
    for meta in info.metadata:
        for attr in CONSTRAINTS:
            value = getattr(meta, attr, None)
            if value is not None:
                out[attr] = value
    return out


def default_of(info: FieldInfo) -> Any:
    """JSON-friendly default; PydanticUndefined means required."""
    if info.default_factory is not None:
        value = info.default_factory()
    else:
        value = info.default
    if value is PydanticUndefined:
        return PydanticUndefined
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return list(value)
    return value


def resolve_loc(loc: tuple) -> tuple[str, type[BaseModel] | None]:
    """A pydantic error location -> (dotted key, the model class holding its last part).

    Union members add a tag to the location (``'int'``, ``'list[str]'``, a class name); those
    are dropped so the key is what the user wrote.
    """
    parts: list[str] = []
    ann: Any = TrainConfig
    parent: type[BaseModel] | None = None
    for el in loc:
        ann, _ = split_optional(ann) if ann is not None else (None, False)
        cls = model_class(ann) if ann is not None else None
        if cls is not None and isinstance(el, str):
            parent = cls
            parts.append(el)
            ann = cls.model_fields[el].annotation if el in cls.model_fields else None
        elif ann is not None and _is_union(ann):
            ann = _union_member(ann, str(el))
        elif ann is not None and get_origin(ann) in (list, tuple) and isinstance(el, int):
            parts.append(str(el))
            args = get_args(ann)
            ann = args[0] if get_origin(ann) is list else (args[el] if el < len(args) else None)
        elif ann is not None and get_origin(ann) is dict:
            parts.append(str(el))
            ann = get_args(ann)[1]
        else:
            parts.append(str(el))
            ann = None
    return ".".join(parts), parent


def _union_member(ann: Any, tag: str) -> Any:
    for member in get_args(ann):
        origin = get_origin(member)
        if origin is not None and tag.startswith(origin.__name__):
            return member
        if isinstance(member, type) and member.__name__ == tag:
            return member
    return None


def _walk(cls: type[BaseModel], prefix: str):
    for name, info in cls.model_fields.items():
        key = f"{prefix}{name}"
        sub = model_class(info.annotation)
        if sub is not None:
            yield from _walk(sub, key + ".")
        else:
            yield key, name, info


@lru_cache(maxsize=1)
def all_field_paths() -> tuple[str, ...]:
    """Every leaf field as a dotted key (lists of models count as one leaf)."""
    return tuple(key for key, _, _ in _walk(TrainConfig, ""))


def field_entry(key: str, name: str, info: FieldInfo) -> dict:
    """Everything a form needs about one field."""
    default = default_of(info)
    _, nullable = split_optional(info.annotation)
    entry = {
        "key": key,
        "name": name,
        "type": type_name(info.annotation),
        "choices": choices(info.annotation),
        "nullable": nullable,
        "required": default is PydanticUndefined,
        "default": None if default is PydanticUndefined else default,
        "description": info.description or "",
        "constraints": constraints(info),
    }
    inner, _ = split_optional(info.annotation)
    if get_origin(inner) is list and model_class(get_args(inner)[0]) is not None:
        item_cls = model_class(get_args(inner)[0])
        entry["item_fields"] = [field_entry(k, n, i) for k, n, i in _walk(item_cls, "")]
    return entry


def describe_schema() -> dict[str, list[dict]]:
    """Per section (``general`` for top-level scalars), its fields with type, choices, default, description.

    Nested sub-sections are flattened to dotted keys (``lora.train_text_encoders.text_encoder``).
    """
    out: dict[str, list[dict]] = {"general": []}
    for name, info in TrainConfig.model_fields.items():
        sub = model_class(info.annotation)
        if sub is None:
            out["general"].append(field_entry(name, name, info))
        else:
            out[name] = [field_entry(k, n, i) for k, n, i in _walk(sub, name + ".")]
    return out


def section_descriptions() -> dict[str, str]:
    return {name: info.description or "" for name, info in TrainConfig.model_fields.items()}
