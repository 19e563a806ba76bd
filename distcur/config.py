"""Stage configs: dataclasses validated in ``__post_init__``, loaded from YAML or dicts.

Every stage config is a dataclass; :func:`load_config` builds one (recursively, for nested
dataclass fields) from a YAML file or a dict and rejects unknown keys, so a mistyped option
fails early instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_STORE = os.environ.get("DISTCUR_STORE", "./distcur-store")


def _build(cls: type, data: Any, where: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return data
    if data is None:
        return cls()
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        target = hint
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            target = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
        if target is not None and dataclasses.is_dataclass(target):
            value = _build(target, value, f"{where}.{name}")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def load_config(cls: type[T], source: str | os.PathLike | dict | None = None, **overrides: Any) -> T:
    """Build ``cls`` from a YAML path or a dict, then apply non-None ``overrides``."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        with open(source) as f:
            data = yaml.safe_load(f) or {}
        where = str(source)
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a YAML mapping at top level")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _build(cls, data, str(source) if source is not None and not isinstance(source, dict) else cls.__name__)


def to_dict(config: Any) -> dict:
    """A config as a plain JSON-able dict (for manifests)."""
    return dataclasses.asdict(config)
