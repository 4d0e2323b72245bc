"""The one way a config dataclass is built from a plain mapping (a YAML section), and the one error.

Every config section (the components' `ModelConfig`, `TransportConfig`, `DataConfig`, ... and the
trainer's own) is a dataclass with `FromDict`: `Section.from_dict(mapping)` refuses unknown keys,
checks (and where lossless, converts) each value against its annotation, then the dataclass checks
its values in `__post_init__` with `invalid(key, value, allowed)`. Every problem is one
`ConfigError` that reads `<key>: <value>: <what is allowed>`, the key dotted from the top of the
config (`model.car_flow`, `encoders[0].name`), with the file and line where the key was written
when the config came from a YAML file.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from typing import Any, Literal

_NO_VALUE = object()


class ConfigError(ValueError):
    """One configuration problem: `[file:line: ]key: value: what is allowed`."""

    def __init__(self, key: str, value: Any = _NO_VALUE, allowed: str = "", *, file: str | None = None,
                 line: int | None = None):
        self.key, self.value, self.allowed, self.file, self.line = key, value, allowed, file, line
        super().__init__(key, allowed)

    def __str__(self) -> str:
        parts = []
        if self.file:
            parts.append(f"{self.file}:{self.line}" if self.line else self.file)
        if self.key:
            parts.append(self.key)
        if self.value is not _NO_VALUE:
            parts.append(show(self.value))
        if self.allowed:
            parts.append(self.allowed)
        return ": ".join(parts)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its key dotted below `prefix` (the section it was found in)."""
        error = copy.copy(self)
        if prefix:
            error.key = prefix if not self.key else (f"{prefix}{self.key}" if self.key.startswith("[")
                                                     else f"{prefix}.{self.key}")
        return error

    def at(self, file: str | None, line: int | None) -> "ConfigError":
        error = copy.copy(self)
        error.file, error.line = file, line
        return error


def show(value: Any) -> str:
    """A value as the user wrote it (YAML-ish): strings quoted, None as null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def invalid(key: str, value: Any, allowed: str) -> ConfigError:
    """The error a section's `__post_init__` raises for `key` (relative to the section)."""
    return ConfigError(key, value, allowed)


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# Type checks from the annotations
# ----------------------------------------------------------------------------------------------

def describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(show(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {describe(inner)}"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def convert(key: str, value: Any, tp) -> Any:
    """`value` checked against (and where lossless, converted to) the annotation `tp`."""
    bad = ConfigError(key, value, f"wrong type; allowed: {describe(tp)}")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(key, value, arg)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, value, describe(tp))
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (inner,) = typing.get_args(tp) or (Any,)
        return [convert(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return tp.from_dict(value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise bad
        return value
    return value


class FromDict:
    """Mixin for config dataclasses: `Config.from_dict(mapping, prefix)`, where an unknown key, a
    wrong type or a value the dataclass refuses is a `ConfigError` naming `prefix.key`."""

    @classmethod
    def from_dict(cls, values: Any, prefix: str = ""):
        if isinstance(values, cls):
            return values
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(prefix or cls.__name__, values, f"a mapping of {cls.__name__} keys")
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [key for key in values if key not in known]
        if unknown:
            raise ConfigError(unknown[0], _NO_VALUE, f"not a known key; allowed: {', '.join(known)}").under(prefix)
        kwargs = {name: convert(f"{prefix}.{name}" if prefix else name, value, hints[name])
                  for name, value in values.items()}
        try:
            return cls(**kwargs)
        except ConfigError as error:
            raise error.under(prefix) from None
