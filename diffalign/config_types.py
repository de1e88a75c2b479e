"""Typed values from parsed YAML: a dataclass built from a mapping, each value converted to its field's
type (unions, literals, lists, numbers written as YAML 1.1 strings), or :class:`ConfigError` naming the
key path, the value and what was expected."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration value: the message names the key path, the value and what was expected."""

    def __init__(self, path: str, value: Any, expected: str):
        self.path, self.value, self.expected = path, value, expected
        super().__init__(f"config key {path!r}: got {value!r}, expected {expected}")


YAML_FALSE, YAML_TRUE = ("no", "off", "false", "n"), ("yes", "on", "true", "y")


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp, path: str):
    """``value`` (parsed YAML) as type ``tp``, or ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(path, value, _describe(tp))
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off (yes/on) as a bool: `mixed_precision: no`
            words = [a for a in args if isinstance(a, str) and a in (YAML_FALSE if not value else YAML_TRUE)]
            if len(words) == 1:
                return words[0]
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise ConfigError(path, value, _describe(tp))
    if origin is list:
        if isinstance(value, str | int | float) and not isinstance(value, bool) and args[0] is not str:
            value = [value]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(path, value, _describe(tp))
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):  # no setting means anything at NaN or inf
            return number
        if number is not None:
            raise ConfigError(path, value, "a finite number")
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{path}: unsupported config field type {tp!r}")
    raise ConfigError(path, value, _describe(tp))


#: Keys renamed since earlier releases -> their name now (one set of sampling names everywhere).
RENAMED_KEYS = {"num_inference_steps": "num_steps", "ref_num_inference_steps": "ref_num_steps"}


def build_dataclass(cls, values: Any, path: str):
    """An instance of dataclass ``cls`` from a mapping; unknown keys and bad values raise ConfigError."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(
            path, values, f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(cls))}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in names and RENAMED_KEYS.get(key) in names:
            raise ConfigError(f"{path}.{key}", values[key],
                              f"{path}.{RENAMED_KEYS[key]} (renamed; same meaning)")
        if key not in names:
            raise ConfigError(
                f"{path}.{key}", values[key], f"no such key; {path} has: {', '.join(sorted(names))}"
            )
    kwargs = {key: _convert(value, hints[key], f"{path}.{key}") for key, value in values.items()}
    return cls(**kwargs)
