"""Stage configs from YAML with command-line overrides, validated on load.

Each stage has one dataclass config whose attribute docstrings document it. A YAML file holds one
section per stage (``prune:``, ...); ``load_config`` checks every key against the dataclass
(unknown keys and wrong types are errors naming the file and the key) and applies overrides.

    python -c "from paser.config import load_config; from paser.models.config import PruneConfig; \
print(load_config(PruneConfig, 'configs/prune-smollm2.yaml', 'prune'))"
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

from paser.errors import ConfigError

# Top-level sections a paser YAML may hold; each is one stage's config.
SECTIONS = ("select", "embed", "manifold", "cluster", "score", "allocate", "sample", "adaptive", "concepts",
            "prune", "distribute", "recover", "evaluate", "compare")


def hint_parts(hint, names: dict | None = None) -> list[str]:
    """The alternatives of a type hint as words: a Literal's values quoted, None for NoneType, and
    ``names`` for the types it names (``float | Literal['off'] | None``: float, 'off', None)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    words = []
    for arg in args:
        if typing.get_origin(arg) is typing.Literal:
            words += [repr(v) for v in typing.get_args(arg)]
        elif (names or {}).get(arg):
            words.append(names[arg])
        else:
            words.append("None" if arg is type(None) else
                         arg.__name__ if isinstance(arg, type) else str(arg).replace("typing.", ""))
    return words


def _words(hint) -> str:
    """A type hint as a user of a YAML file reads it: "a number, 'off' or null"."""
    words = hint_parts(hint, {float: "a number", int: "an integer", str: "text", bool: "true or false",
                              type(None): "null"})
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def _check(value, hint, where: str):
    """Return ``value`` converted to ``hint`` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not {_words(hint)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check(v, a, where) for v, a in zip(value, args))
    if origin in (list, dict) or hint in (list, dict):
        if not isinstance(value, origin or hint):
            raise ConfigError(f"{where}: expected a {(origin or hint).__name__}, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def from_mapping(cls, data: dict, where: str):
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {k: _check(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def config_with(config, overrides: dict):
    """A copy of the dataclass ``config`` with the given fields replaced (unknown names are errors)."""
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown {type(config).__name__} option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(config, **overrides)


def load_config(cls, path: str | Path | None, section: str, overrides: dict | None = None):
    """``cls`` from the ``section`` of a YAML file (or defaults), then ``overrides`` on top.

    Overrides whose value is None are ignored, so unset CLI options keep the file's values.
    """
    data: dict = {}
    where = section
    if path is not None:
        doc = read_yaml(path)
        unknown = sorted(set(doc) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
        where = f"{path}: {section}"
        data = dict(doc.get(section) or {})
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_mapping(cls, data, where)


def to_mapping(config) -> dict:
    """A YAML-friendly dict of a config (tuples as lists)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
