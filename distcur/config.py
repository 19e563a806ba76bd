"""Stage configs: dataclasses validated in ``__post_init__``, loaded from YAML or dicts.

Every stage config is a dataclass; :func:`load_config` builds one (recursively, for nested
dataclass fields) from a YAML file or a dict, rejects unknown keys and checks every value
against its field's type (bool, int, float, str, tuples, lists, dicts, Optional, unions,
Literal, enums), so a mistyped option or a quoted number fails early, naming file, key, value
and the expected type, instead of being silently misread.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import enum
import os
import re
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_STORE = os.environ.get("DISTCUR_STORE", "./distcur-store")


class ConfigError(ValueError):
    """A config file or value that does not fit its dataclass."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


# A job writes a stage's inline config to a temporary file headed by this comment (jobs/_common.py), so
# errors name the job config file and section it came from, not a file that is gone when they are read.
ORIGIN_COMMENT = "# distcur config from: "


def config_origin(path: str | os.PathLike) -> str:
    """What errors call the config file at ``path``: the job config section it was written from, else the path."""
    try:
        with open(path) as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return str(path)
    return first[len(ORIGIN_COMMENT):].strip() if first.startswith(ORIGIN_COMMENT) else str(path)


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document at ``path``; malformed YAML is a :class:`ConfigError` naming file and line."""
    with open(path) as f:
        try:
            return yaml.load(f, Loader=_Loader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{config_origin(path)}: malformed YAML{at}: {problem}") from None


class _Mismatch(Exception):
    """``value`` at ``path`` (relative to the option) does not fit ``expected``."""

    def __init__(self, value: Any, expected: Any, path: str = ""):
        super().__init__(path)
        self.value, self.expected, self.path = value, expected, path


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return re.sub(r"\btyping\.|\bcollections\.abc\.", "", str(hint)).replace("NoneType", "None")


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` as a ``hint`` (nested dataclasses built, lists made tuples for tuple fields), or _Mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is None or hint is Any or isinstance(hint, typing.TypeVar):
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own mismatch, with its path
            return _check(value, options[0], where)
        for arg in options:
            try:
                return _check(value, arg, where)
            except _Mismatch:
                continue
        raise _Mismatch(value, hint)
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch(value, f"one of {list(args)}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        for member in hint:
            if value in (member.value, member.name):
                return member
        raise _Mismatch(value, f"one of {[m.value for m in hint]}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        raise _Mismatch(value, hint)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(value, hint)
    if hint in (bool, str):
        if isinstance(value, hint):
            return value
        raise _Mismatch(value, hint)
    container = origin or hint
    if container in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            raise _Mismatch(value, hint)
        if container is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch(value, hint)
            items = [(v, a) for v, a in zip(value, args)]
        else:
            items = [(v, args[0] if args else Any) for v in value]
        out = []
        for i, (v, a) in enumerate(items):
            try:
                out.append(_check(v, a, f"{where}[{i}]"))
            except _Mismatch as e:
                raise _Mismatch(e.value, e.expected, f"[{i}]{e.path}") from None
        return tuple(out) if container is tuple else list(out) if container is list else type(value)(out)
    if container in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise _Mismatch(value, hint)
        if not args:
            return value
        out = {}
        for k, v in value.items():
            try:
                out[_check(k, args[0], where)] = _check(v, args[1], f"{where}[{k!r}]")
            except _Mismatch as e:
                raise _Mismatch(e.value, e.expected, f"[{k!r}]{e.path}") from None
        return out
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _Mismatch(value, hint)
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return data
    if data is None:
        return cls()
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = _field_default(fields[name])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            # a nested config given in part: the rest keeps the enclosing config's default for it
            # (``train: {lr: 0.01}`` keeps the demo's policy size, not TrainConfig's class defaults)
            value = merge_options(dataclasses.asdict(default), value)
        try:
            kwargs[name] = _check(value, hints.get(name), f"{where}.{name}")
        except _Mismatch as e:
            expected = e.expected if isinstance(e.expected, str) else _type_name(e.expected)
            got = type(e.value).__name__
            raise ConfigError(f"{where}: {name}{e.path} = {e.value!r} is {'an' if got[0] in 'aeiou' else 'a'} {got}, but "
                              f"{cls.__name__}.{name} expects {expected}") from None
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {cls.__name__}: {e}") from None


def load_config(cls: type[T], source: str | os.PathLike | dict | None = None, /, **overrides: Any) -> T:
    """Build ``cls`` from a YAML path or a dict, then apply non-None ``overrides`` (positional-only
    ``cls`` and ``source``, so a config may have fields of those names, e.g. an ingest stage's ``source``)."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        data = read_yaml(source)
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{config_origin(source)}: expected a YAML mapping at top level, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _build(cls, data, config_origin(source) if source is not None and not isinstance(source, dict)
                  else cls.__name__)


def merge_options(base: dict, over: dict) -> dict:
    """``over`` laid onto ``base``, nested mappings merged key by key (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_options(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(config: Any) -> dict:
    """A config as a plain JSON-able dict (for manifests)."""
    return dataclasses.asdict(config)


def flag_kwargs(hint: Any) -> dict:
    """argparse ``type`` / ``nargs`` for a field's type hint (Optional[X] as X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        item = typing.get_args(hint)[0] if typing.get_args(hint) else str
        return {"nargs": "+", "type": item if item in (int, float) else str}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float):
        return {"type": hint}
    return {}  # str, and unions such as "str | float" that the dataclass parses itself


_NO_DEFAULT = object()


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _NO_DEFAULT


def _leaves(cls: type, path: tuple[str, ...] = (), owner: Any = _NO_DEFAULT) -> list[tuple]:
    """Every non-dataclass field of ``cls``, nested dataclass fields flattened: (path, field, hint,
    default), the default being the enclosing config's (a nested config's own default instance)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        # owner None: a nested config whose field defaults to None (built from its class's defaults)
        default = getattr(owner, f.name) if owner is not _NO_DEFAULT and owner is not None else _field_default(f)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], (*path, f.name), default)
        else:
            out.append(((*path, f.name), f, hints[f.name], default))
    return out


def add_config_flags(parser, cls: type, flags: dict[str, str] | None = None, helps: dict[str, str] | None = None,
                     choices: dict[str, tuple] | None = None, skip: tuple[str, ...] = ()) -> list[str]:
    """One ``--<field>`` flag per field of dataclass ``cls`` (default None: only what is given
    overrides the config file; the dataclass checks the value). The fields of a nested dataclass
    field (a stage config's ``train: TrainConfig``) get flags too: ``--<subfield>``, or
    ``--<field>-<subfield>`` where two nested configs share a name. ``flags`` renames a field's flag,
    ``helps`` gives its help (else the field's ``metadata["help"]``), ``choices`` its choices (else
    the field's ``metadata["choices"]``), ``skip`` leaves fields out; all three are keyed by the
    field's dotted path (``"train.lr"``) or, for a top-level field, its name. Returns the dotted
    paths added, for :func:`config_from_args`."""
    leaves = [leaf for leaf in _leaves(cls) if ".".join(leaf[0]) not in skip and leaf[0][0] not in skip]
    counts = collections.Counter(path[-1] for path, _, _, _ in leaves)
    added = []
    for path, f, hint, default in leaves:
        name = ".".join(path)
        flag = (flags or {}).get(name)
        if flag is None:
            words = path[-1] if counts[path[-1]] == 1 or len(path) == 1 else "-".join(path[-2:])
            flag = "--" + words.replace("_", "-")
        kw = {"default": None, "dest": name, **flag_kwargs(hint)}
        has_choices = bool((choices or {}).get(name) or "choices" in f.metadata)
        if kw.get("action") is None and not has_choices:
            kw["metavar"] = path[-1].upper()
        default = None if default is _NO_DEFAULT else default
        if isinstance(default, tuple | list):
            default = " ".join(map(str, default))
        text = (helps or {}).get(name) or f.metadata.get("help", path[-1].replace("_", " "))
        kw["help"] = text + (f" (default {default})" if default not in (None, "") and "default" not in text else "")
        if (choices or {}).get(name) or "choices" in f.metadata:
            kw["choices"] = (choices or {}).get(name) or f.metadata["choices"]
        parser.add_argument(flag, **kw)
        added.append(name)
    return added


def _merge(data: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        inner = data.get(key)
        data[key] = inner = dict(inner) if isinstance(inner, dict) else ({} if inner is None else inner)
        if not isinstance(inner, dict):  # an already-built dataclass: rebuilt from its fields
            data[key] = inner = dataclasses.asdict(inner)
        data = inner
    data[path[-1]] = value


def config_from_args(cls: type[T], args, names: list[str], source: str | os.PathLike | dict | None = None) -> T:
    """``cls`` from the YAML ``source`` (if any), the flags given on the command line winning; ``names``
    are the dotted paths :func:`add_config_flags` returned."""
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if not any("." in n for n in given):
        return load_config(cls, source, **given)
    if source is not None:  # the file's own errors, naming it (with the top-level flags: required fields)
        load_config(cls, source, **{n: v for n, v in given.items() if "." not in n})
    data = {} if source is None else _source_dict(source)
    for name, value in given.items():
        _merge(data, name.split("."), value)
    return load_config(cls, data)


def _source_dict(source: str | os.PathLike | dict) -> dict:
    if isinstance(source, dict):
        return dict(source)
    data = read_yaml(source)
    return {} if data is None else dict(data)
