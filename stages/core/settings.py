"""One settings contract per stage: a typed dataclass with help text, read from the ``--settings`` JSON.

Every stage's ``--settings`` is one JSON object, parsed by :func:`settings_json` (the argparse type
of :func:`add_settings_argument`) and turned into the stage's dataclass by :func:`from_mapping`,
which refuses unknown keys (a typo must not fall back to a default) *and* missing ones, naming the
stage and the key. Fields carry their help text (``field(metadata={"help": ...})``, as PEFT's
configs do) and, where the pipeline fills them from the config, the schema key they come from
(``metadata={"schema": "train.lr"}``).

The schema (``workflow/schemas/config.schema.yaml``) is the one source of pipeline defaults: a
field that the pipeline always passes has no default here, and a field that keeps one for direct
callers must equal the schema's (``tests/integration/test_settings.py`` compares every such pair).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, cast

from stages.core.errors import InputError

__all__ = [
    "SettingsError",
    "add_settings_argument",
    "add_threads_argument",
    "apply_threads",
    "from_mapping",
    "setting",
    "settings_help",
    "settings_json",
]

T = TypeVar("T")


class SettingsError(InputError):
    """A ``--settings`` object that does not fit its stage's contract."""


def setting(
    default: Any = dataclasses.MISSING, *, help: str, schema: str | None = None, factory: Any = dataclasses.MISSING
) -> Any:
    """A dataclass field with its help text and, optionally, the schema key it comes from.

    Args:
        default: the default for direct callers; leave it out where the pipeline always passes the key.
        help: one sentence on what the setting does.
        schema: the dotted config key (``train.lr``) whose value the pipeline passes here.
        factory: a default factory (mutable defaults).
    """
    metadata = {"help": help, **({"schema": schema} if schema else {})}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def settings_json(text: str) -> dict[str, Any]:
    """The argparse type of every stage's ``--settings``: a JSON object, or an error naming the problem."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError("--settings", f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise InputError("--settings", f"must be a JSON object, got {type(value).__name__}")
    return value


def add_settings_argument(
    parser: argparse.ArgumentParser, contract: type | None = None, required: bool = False
) -> None:
    """Add the one ``--settings JSON`` option (naming the stage's dataclass in its help)."""
    what = f"JSON object, the fields of {contract.__module__}.{contract.__qualname__}" if contract else "JSON object"
    kwargs: dict[str, Any] = {"required": True} if required else {"default": {}}
    parser.add_argument("--settings", type=settings_json, help=what, **kwargs)


def _is_dataclass_type(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _type_ok(value: Any, kind: Any) -> bool:
    """A shallow check of ``value`` against a field's annotation (the stage checks ranges and choices)."""
    if kind is Any:
        return True
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping) or kind in (dict, Mapping):
        return isinstance(value, Mapping)
    if origin is typing.Literal:
        return value in typing.get_args(kind)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if _is_dataclass_type(kind):
        return isinstance(value, Mapping)
    return True


def _nested(kind: Any) -> type | None:
    """The dataclass a field holds (itself, or inside ``X | None``), else None."""
    if _is_dataclass_type(kind):
        return kind
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        found = [k for k in typing.get_args(kind) if _is_dataclass_type(k)]
        return found[0] if found else None
    return None


def from_mapping(cls: type[T], mapping: Any, stage: str, where: str = "--settings", noun: str = "settings") -> T:
    """Build the settings dataclass ``cls`` of ``stage`` from a mapping, refusing unknown and missing keys.

    Nested dataclass fields are built the same way from nested objects. Numbers given as integers
    where a float is declared are accepted as they are (JSON has one number type).

    Args:
        cls: the stage's settings dataclass.
        mapping: the ``--settings`` object (or the part of it this dataclass reads).
        stage: the stage's name, for the message (``train``, ``query_round``).
        where: the key path of ``mapping``, for the message.
        noun: what the keys are called in the message (``settings``, ``options``).

    Raises:
        SettingsError: naming the stage, the key and the problem.
    """
    if not isinstance(mapping, Mapping):
        raise SettingsError(where, f"{stage}: must be an object, got {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise SettingsError(where, f"{stage}: unknown {noun} {unknown}; known: {sorted(fields)}")
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in mapping and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise SettingsError(where, f"{stage}: missing {noun} {missing} (the pipeline passes them from the config)")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, value in mapping.items():
        kind = hints.get(name, Any)
        if not _type_ok(value, kind):
            raise SettingsError(f"{where}.{name}", f"{stage}: expected {_type_name(kind)}, got {value!r}")
        inner = _nested(kind)
        values[name] = from_mapping(inner, value, stage, f"{where}.{name}") if inner and value is not None else value
    return cls(**values)


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def settings_help(cls: type) -> list[tuple[str, str, str]]:
    """(name, default or "required", help) of each field of ``cls``, for documentation."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        rows.append((f.name, default, str(f.metadata.get("help", ""))))
    return rows


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--threads N`` option of a stage that computes with torch (the rule passes its ``threads``)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (the rule's threads); default: torch's own choice",
    )


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads from ``--threads`` (None: leave torch's choice).

    CPU results are bit-identical for a given thread count, not across thread counts.
    """
    if threads is None:
        return
    if threads < 1:
        raise SettingsError("--threads", f"must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
