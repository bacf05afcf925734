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
SECTIONS = ("prompt", "select", "embed", "manifold", "cluster", "score", "allocate", "sample", "adaptive", "concepts",
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


def concerns(cls) -> dict[str, type]:
    """The fields of config ``cls`` that each hold one concern's dataclass (``FLAT``: recover's
    ``lora``, ``steps``, ``data``, ``loss``), by name: their keys sit flat in the YAML section and on
    the command line (``recover.epochs``), the object nests them (``config.steps.epochs``)."""
    names = getattr(cls, "FLAT", ())
    hints = typing.get_type_hints(cls) if names else {}
    return {name: hints[name] for name in names}


def section_keys(cls) -> dict[str, type]:
    """The keys of ``cls``'s YAML section, in order, with the dataclass that declares each: its own
    fields, and a concern's keys in the concern field's place."""
    held = concerns(cls)
    keys: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        keys |= section_keys(held[f.name]) if f.name in held else {f.name: cls}
    return keys


def key_hint(cls, key: str):
    """The type hint of section key ``key`` of ``cls`` (a concern's key included)."""
    return typing.get_type_hints(section_keys(cls)[key])[key]


def from_mapping(cls, data: dict, where: str, shared: dict | None = None):
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types; a concern it
    holds (``concerns``) is built from its keys in the same mapping. ``shared``: the configs of
    sections of their own that ``cls`` holds as fields of the same names (the ``prompt`` section),
    already built (``shared_sections``); ``data`` may not set them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    owners = section_keys(cls)
    fields = set(owners)
    moved = getattr(cls, "MOVED", {})
    for key in data:
        if key in moved:
            raise ConfigError(f"{where}.{key} is now {moved[key]}: one setting of its own section, shared by "
                              "every command")
        if key in SECTIONS:
            raise ConfigError(f"{where}.{key}: {key} is a section of its own, shared by every command; set it there")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields - set(SECTIONS))}")
    values = {k: _check(v, hints[k], f"{where}.{k}") for k, v in data.items() if owners[k] is cls}
    values |= {name: from_mapping(concern, {k: v for k, v in data.items() if owners[k] is concern}, where)
               for name, concern in concerns(cls).items()}
    values |= {k: v for k, v in (shared or {}).items() if k in fields}
    try:
        return cls(**values)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def shared_sections(cls, sections: dict, where: str) -> dict:
    """The configs of the sections of their own that ``cls`` holds as fields of the same names
    (``prompt``), built from ``sections`` (``{section: {key: value}}``; values of None are
    ignored); ``where`` names the file."""
    held = [f.name for f in dataclasses.fields(cls) if f.name in SECTIONS]
    hints = typing.get_type_hints(cls) if held else {}
    return {name: from_mapping(hints[name], {k: v for k, v in (sections.get(name) or {}).items() if v is not None},
                               f"{where}: {name}")
            for name in held}


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
    """A copy of the dataclass ``config`` with the given fields replaced (unknown names are errors);
    a config it holds takes a dict of its own fields (``prompt={"cutoff": 512}``), and a concern's
    key is given flat, as in the YAML section (``epochs=1`` sets ``config.steps.epochs``)."""
    held = concerns(type(config))
    owners = section_keys(type(config))
    flat = {k: v for k, v in overrides.items() if k in owners and owners[k] is not type(config)}
    overrides = {k: v for k, v in overrides.items() if k not in flat}
    for name, concern in held.items():
        mine = {k: v for k, v in flat.items() if owners[k] is concern}
        if mine:
            given = overrides.get(name, {})
            overrides[name] = given | mine if isinstance(given, dict) else dataclasses.replace(given, **mine)
    known = {f.name for f in dataclasses.fields(config)} | set(owners)
    moved = getattr(config, "MOVED", {})
    for key in set(overrides) & set(moved):
        section, field = moved[key].split(".")
        raise TypeError(f"{key} is now {moved[key]}: pass {section}={{{field!r}: ...}}")
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown {type(config).__name__} option(s) {unknown}; known: {sorted(known)}")
    values = {k: dataclasses.replace(getattr(config, k), **v)
              if isinstance(v, dict) and dataclasses.is_dataclass(getattr(config, k)) else v
              for k, v in overrides.items()}
    return dataclasses.replace(config, **values)


def load_config(cls, path: str | Path | None, section: str, overrides: dict | None = None):
    """``cls`` from the ``section`` of a YAML file (or defaults), then ``overrides`` on top.

    Overrides whose value is None are ignored, so unset CLI options keep the file's values; a
    section of its own that ``cls`` holds (``prompt``) takes its overrides under its name
    (``{"prompt": {"cutoff": 512}}``).
    """
    doc: dict = {}
    where = section
    if path is not None:
        doc = read_yaml(path)
        unknown = sorted(set(doc) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
        where = f"{path}: {section}"
    overrides = dict(overrides or {})
    data = dict(doc.get(section) or {})
    sections = {name: dict(doc.get(name) or {}) | {k: v for k, v in (overrides.pop(name, None) or {}).items()
                                                    if v is not None}
                for name in SECTIONS if name != section}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(cls, data, where, shared_sections(cls, sections, str(path) if path is not None else section))


def to_mapping(config) -> dict:
    """A YAML-friendly dict of a config (tuples as lists, a config it holds as a dict, a concern's
    keys flat in its place, as its YAML section writes them)."""
    out = {}
    held = concerns(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in held:
            out |= to_mapping(value)
            continue
        out[f.name] = (list(value) if isinstance(value, tuple) else
                       to_mapping(value) if dataclasses.is_dataclass(value) else value)
    return out
