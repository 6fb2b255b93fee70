"""Typed settings from plain dicts: dataclasses whose fields carry their help text, filled from YAML or
``key=value`` values strictly — unknown keys and wrong types are collected as problems, never raised one
at a time, never ignored. The train config (config.py) and the serve limits (server.py) are read here.
No torch import.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Literal, Union

from .errors import did_you_mean


def setting(default: Any, text: str) -> Any:
    """A dataclass field with its help text (``peftlab keys`` and the docs show it); a list default is
    copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "null"}.get(tp, str(tp))


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value) with ``value`` converted to ``tp`` where it fits: YAML's 1e-3 (a string) to a float,
    ``a,b`` from the command line to a list; never a bool for a number or a number for a bool."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if isinstance(value, str) and "," in value:  # "query,value" means a list where one is allowed
            args = sorted(args, key=lambda a: typing.get_origin(a) is not list)
        for arg in args:
            ok, v = coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is Literal:
        return (value in typing.get_args(tp)), value
    if origin is list:
        if isinstance(value, str):  # key=a,b on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            return False, value
        items = [coerce(v, typing.get_args(tp)[0]) for v in value]
        return (True, [v for _, v in items]) if all(ok for ok, _ in items) else (False, value)
    if tp is float and isinstance(value, str):
        try:
            return True, float(value)
        except ValueError:
            return False, value
    if tp is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)), (
            float(value) if isinstance(value, (int, float)) else value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    checks = {type(None): lambda v: v is None, bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}
    return (checks[tp](value) if tp in checks else False), value


def _choices(tp: Any) -> list:
    """The literal values a type (or one arm of a union) allows."""
    arms = [tp, *typing.get_args(tp)]
    return [x for a in arms if typing.get_origin(a) is Literal for x in typing.get_args(a)]


def _type_problem(name: str, tp: Any, value: Any) -> str:
    hint = ""
    choices = _choices(tp) or [x for a in typing.get_args(tp) if typing.get_origin(a) is list
                               for x in _choices(typing.get_args(a)[0])]
    if choices:  # a list (or key=a,b) is judged by its first bad item: did-you-mean for 'mlfow', not the list
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        bad = next((str(v).strip() for v in items if str(v).strip() not in map(str, choices)), value)
        hint = did_you_mean(bad, choices)
    return f"{name}: expected {type_name(tp)}, got {value!r}{hint}"


def build(cls, data: Any, prefix: str, problems: list[str], notes: list[str],
          aliases: dict[str, str] | None = None):
    """An instance of dataclass ``cls`` from ``data``; what does not fit is appended to ``problems``
    (the field keeps its default), and the allowed keys of a section with an unknown key to ``notes``.
    ``aliases`` maps other tools' dotted names to ours (``train.lr`` → ``train.learning_rate``)."""
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in hints:
            hint = f" — did you mean '{aliases[name]}'?" if aliases and name in aliases else \
                did_you_mean(key, names, prefix)
            problems.append(f"unknown key '{name}'{hint}")
            if not hint:
                notes.append(f"{prefix.rstrip('.') or 'top-level'} keys: {', '.join(names)}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value if value is not None else {}, f"{name}.", problems, notes, aliases)
            continue
        ok, coerced = coerce(value, tp)
        if ok:
            kwargs[key] = coerced
        else:
            problems.append(_type_problem(name, tp, value))
    return cls(**kwargs)


def describe(cls, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) of every field, nested sections flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))
    return rows
