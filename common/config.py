"""Typed configuration: nested dataclasses loaded from YAML, then `--set a.b=value` overrides.

Why dataclasses and not free dicts: a typo in a YAML key or a CLI override must fail at start-up
with the key's name and the valid choices, not silently train the wrong model for three days.
The same loader serves every CLI (training, sharding, sampling); it lives here, apart from every
schema, so model/, data_pipeline/, trainer/ and slurm/ can all import it and none imports another
for it. Each schema stays next to what it configures.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
import warnings
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class RenamedWarning(FutureWarning):
    """An old name (config key, CLI flag, keyword) was used: it still works, under its new name.

    A FutureWarning, not a DeprecationWarning, because Python shows it by default: the people who
    must edit their YAML or command line are users of the CLIs, not only developers.
    """


def warn_renamed(old: str, new: str, why: str = "", stacklevel: int = 3) -> None:
    """Warn that `old` is deprecated in favour of `new` (both named in the message)."""
    warnings.warn(f"{old} is deprecated; use {new} instead{' (' + why + ')' if why else ''}", RenamedWarning,
                  stacklevel=stacklevel)


class ConfigError(ValueError):
    """A config key or value that does not fit the schema; the message names the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value against a dataclass field annotation (resolved type)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _to_union(value, tp, key)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _to_section(value, tp, key)
    if origin in (list, tuple):
        return _to_sequence(value, tp, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    scalar = _SCALARS.get(tp)
    return value if scalar is None else scalar(value, key)


def _to_union(value: Any, tp: Any, key: str) -> Any:
    """The first member type that accepts the value (None only where the union allows it)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")


def _to_section(value: Any, tp: type, key: str) -> Any:
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping for section {_type_name(tp)}, got {value!r}")
    return from_dict(tp, value, prefix=key + ".")


def _to_sequence(value: Any, tp: Any, key: str) -> list | tuple:
    """A list or tuple, item by item; on the command line `[1, 2]` (YAML) or `1,2`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, str):
        value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item_tp = args[0] if args else Any
    items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"{key}: expected true/false, got {value!r}")


def _to_int(value: Any, key: str) -> int:
    """Integers, and floats or strings that are whole numbers (YAML reads 1e6 as a string); never a bool."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(float(value)) if float(value).is_integer() else int(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _to_str(value: Any, key: str) -> str:
    if value is None:  # `--set key=` (YAML reads an empty value as null): the empty string
        return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected a string, got {value!r}")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _renamed_keys(cls: type, data: dict, prefix: str) -> dict:
    """`data` with the old keys of `cls.RENAMED` (old -> new) under their new names, each with a
    RenamedWarning naming both; both names at once is an error."""
    renamed = getattr(cls, "RENAMED", {})
    if not any(old in data for old in renamed):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old in data:
            if new in data:
                raise ConfigError(f"{prefix}{old} and {prefix}{new} are both set; {old} is the old name of {new}: "
                                  f"keep only {new}")
            warn_renamed(f"config key {prefix}{old}", f"{prefix}{new}", getattr(cls, "RENAMED_WHY", ""))
            data[new] = data.pop(old)
    return data


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys are an error naming the valid ones, old
    keys (`cls.RENAMED`) are read under their new names with a warning."""
    data = _renamed_keys(cls, data, prefix)
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    kwargs = {name: _coerce(value, fields[name][1], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e
    except ValueError as e:  # a section's __post_init__ check (its message names the key)
        raise ConfigError(str(e)) from e


def to_dict(cfg: Any) -> dict:
    """Plain, YAML/JSON-serialisable dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def _parse_override_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides: list[str], cls: type | None = None) -> dict:
    """Apply `a.b.c=value` strings to a nested dict (values parsed as YAML scalars/lists).

    With `cls`, each path is checked against the schema first so the error names the bad key.
    """
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        old_names: list[str] = []
        if cls is not None:
            parts, old_names = _check_path(cls, parts)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {path}: {p} is not a section")
        for old in old_names:  # the override wins over the file's value under the key's old name
            node.pop(old, None)
        node[parts[-1]] = _parse_override_value(raw)
    return data


def _check_path(cls: type, parts: list[str]) -> tuple[list[str], list[str]]:
    """(the path with a renamed last key under its new name, warned; the last key's old names)."""
    cur: Any = cls
    parts = list(parts)
    old_names: list[str] = []
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(cur):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[:i])} is not a section")
        fields = _fields(cur)
        renamed = getattr(cur, "RENAMED", {})
        if p in renamed:
            parts[i] = renamed[p]
            warn_renamed(f"override {'.'.join(parts[:i] + [p])}", ".".join(parts[: i + 1]),
                         getattr(cur, "RENAMED_WHY", ""))
            p = parts[i]
        old_names = [old for old, new in renamed.items() if new == p]
        if p not in fields:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(
                f"unknown config key {'.'.join(parts[: i + 1])}; valid keys in {where}: " + ", ".join(sorted(fields))
            )
        tp = fields[p][1]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        cur = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp
    return parts, old_names


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) + overrides → validated dataclass. The one loader every CLI uses."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data = loaded or {}
    data = apply_overrides(data, overrides or [], cls)
    return from_dict(cls, data)
