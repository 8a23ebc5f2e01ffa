"""YAML -> dataclasses: safe loading only, unknown keys rejected, CLI overrides.

Overrides use dotted paths: ``optim.lr=1e-3 model.encoder=resnet18``; values are
parsed as YAML scalars so numbers, booleans and null behave as in the file.
Unlike plain ``yaml.safe_load`` (YAML 1.1), exponent floats without a dot such
as ``1e-3`` load as floats, not strings.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from depthkd_core.atomic import atomic_open

C = TypeVar("C")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3``/``5E4`` as floats (YAML 1.2 style)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text with the safe loader above (no tags that run code)."""
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in _union_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 else tp


def _matches(value: Any, tp: Any) -> bool:
    """Type check for plain scalar fields; containers and other types pass."""
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _convert(value: Any, hint: Any, where: str) -> Any:
    tp = _unwrap_optional(hint)
    if _is_dataclass_type(tp):
        if value is None and type(None) not in _union_args(hint):
            value = {}  # an empty YAML section (``model:``) means all defaults
        if isinstance(value, dict):
            return from_dict(tp, value, where)
        if value is not None:
            raise ValueError(f"config key {where} must be a mapping, got {value!r}")
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args and _is_dataclass_type(args[0]):
        if not isinstance(value, list):
            raise ValueError(f"config key {where} must be a list, got {value!r}")
        return [_convert(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict and len(args) == 2 and _is_dataclass_type(args[1]):
        if not isinstance(value, dict):
            raise ValueError(f"config key {where} must be a mapping, got {value!r}")
        return {key: _convert(item, args[1], f"{where}.{key}") for key, item in value.items()}
    if not any(_matches(value, arg) for arg in _union_args(hint)):
        raise ValueError(f"config key {where} has the wrong type: {value!r} is not {hint}")
    if tp is float and isinstance(value, int):
        return float(value)
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def from_dict(cls: type[C], data: dict[str, Any] | None, path: str = "") -> C:
    """Build dataclass ``cls`` from a nested dict, recursing into dataclass fields."""
    data = dict(data or {})
    where = path or cls.__name__
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) in {where}: {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(fields))}")
    missing = sorted(name for name, f in fields.items() if name not in data
                     and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"missing required config key(s) in {where}: {', '.join(missing)}")
    kwargs = {name: _convert(value, hints[name], f"{path}.{name}" if path else name)
              for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict (in place) and return it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"override '{item}' is not of the form key=value")
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ValueError(f"override '{item}': '{part}' is not a section")
        try:
            node[parts[-1]] = parse_yaml(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"override '{item}': the value is not valid YAML ({exc.problem}; "
                             "quote a value holding brackets inside a list)") from None
    return data


def load_config(cls: type[C], path: str | Path | None = None,
                overrides: list[str] | None = None) -> C:
    """Read YAML at ``path`` (optional), apply overrides, map onto ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = parse_yaml(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config {path} must be a mapping at the top level")
        data = loaded or {}
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically (a crash never leaves half a file)."""
    with atomic_open(path, "w") as f:
        f.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
