"""The one configuration mechanism: a dataclass per method, strategy, head, scenario family, executor and
config section, built from a mapping by :func:`parse_options`, which turns unknown keys into a
did-you-mean ConfigError and recurses into nested dataclass fields (the study and pretrain configs).

A field declared with :func:`knob` carries its reason and its checks (type from the annotation, bounds
and choices from the knob), which :func:`parse_options` applies through :mod:`avl_peft.validate`; other
fields are left to the dataclass's own ``__post_init__`` (cross-field rules live there, on their owner).
Adding a config key is one ``knob`` line.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from . import validate
from .errors import ConfigError
from .registry import suggest

T = TypeVar("T")


def knob(
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_min: bool = False,
    exclusive_max: bool = False,
    choices: Sequence[str] | None = None,
) -> Any:
    """A checked dataclass field: ``default`` (mutable ones copied per instance), its one-line reason,
    bounds (numbers) and ``choices`` (strings; pass the owner's tuple, never a copy).

    The annotation gives the type: ``int``, ``bool``, ``str``, ``dict``, ``list``; ``float`` is a finite number
    stored as a float; ``int | float`` a finite number kept as written (an ``lr: 1`` stays 1 in run ids);
    ``X | None`` allows null."""
    meta = {
        "doc": doc,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_min": exclusive_min,
        "exclusive_max": exclusive_max,
        "choices": choices,
    }
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _split_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) < len(typing.get_args(hint)):
            return (args[0] if len(args) == 1 else functools.reduce(operator.or_, args)), True
    return hint, False


def _type_name(kind: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))


def _check_knob(key: str, value: Any, hint: Any, meta: Any) -> Any:
    """One knob's value, checked against its annotation and bounds (validate.py), naming ``key``."""
    kind, nullable = _split_optional(hint)
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{key}: must be {_type_name(kind)}, got null")
    label = f"{key}:"
    if kind is bool:
        return validate.check_bool(label, value)
    if kind is int:
        return validate.check_int(label, value, minimum=meta["minimum"], maximum=meta["maximum"])
    number = kind == int | float or kind == float | int
    if kind is float or number:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string; accept what is plainly a number
                value = float(value)
            except ValueError:
                pass
        checked = validate.check_number(
            label,
            value,
            low=meta["minimum"],
            high=meta["maximum"],
            exclusive_low=meta["exclusive_min"],
            exclusive_high=meta["exclusive_max"],
        )
        return value if number and validate.is_int(value) else checked
    origin = typing.get_origin(kind) or kind
    if not isinstance(value, origin):
        raise ConfigError(f"{key}: must be {_type_name(origin)}, got {value!r} ({type(value).__name__})")
    if meta["choices"] is not None:
        validate.check_choice(label, value, tuple(meta["choices"]))
    return value


def option_names(cls: type) -> list[str]:
    """The keys users write for ``cls``: its fields, under their ``ALIASES`` spelling where one exists
    (e.g. ``lambda`` for ``orth_lambda``, a Python keyword)."""
    aliases = getattr(cls, "ALIASES", {})
    return [aliases.get(f.name, f.name) for f in dataclasses.fields(cls)]


def parse_options(cls: type[T], owner: str, options: Any, *, noun: str = "option") -> T:
    """``cls(**options)`` with every key checked first; ``owner`` names whose options these are.

    ``noun="key"`` words errors as config keys (``unknown key 'lrr' in 'training'``); nested dataclass
    fields are parsed the same way under the dotted owner ``owner.field``.
    """
    if options is None:
        options = {}
    if not isinstance(options, dict):
        if noun == "option":
            raise ConfigError(f"{owner}: options must be a mapping of names to values, got {type(options).__name__}")
        raise ConfigError(f"{owner or 'config'}: must be a mapping of keys to values, got {type(options).__name__}")
    allowed, inverse, checked = _spec(cls)
    kwargs = {}
    for key, value in options.items():
        if not isinstance(key, str) or (key not in allowed and key not in inverse.values()):
            hint = f"Allowed: {', '.join(allowed) or '(none)'}.{suggest(str(key), allowed)}"
            if noun == "option":
                raise ConfigError(f"{owner} has no option '{key}'. {hint}")
            where = f"in '{owner}' ({owner}.{key})" if owner else "at the top level"
            raise ConfigError(f"unknown key '{key}' {where}. {hint}")
        name = inverse.get(key, key)
        if name in kwargs:
            raise ConfigError(f"{owner}: give '{key}' or '{name}', not both")
        kwargs[name] = value
    prefix = f"{owner}." if owner else ""
    for name, section, hint, meta in checked:  # in field order, so the first bad key is the one reported
        if section is not None:
            kwargs[name] = parse_options(section, prefix + name, kwargs.get(name), noun=noun)
        elif name in kwargs:
            kwargs[name] = _check_knob(prefix + name, kwargs[name], hint, meta)
    return cls(**kwargs)


@functools.cache
def _spec(cls: type) -> tuple[list[str], dict[str, str], list[tuple[str, Any, Any, Any]]]:
    """What :func:`parse_options` needs of ``cls``, worked out once: the keys users write, alias -> field,
    and the fields it checks: (name, nested dataclass or None, annotation, knob metadata)."""
    hints = _hints(cls)
    checked = []
    for f in dataclasses.fields(cls):
        kind, _ = _split_optional(hints[f.name])
        if dataclasses.is_dataclass(kind):
            checked.append((f.name, kind, None, None))
        elif "doc" in f.metadata:
            checked.append((f.name, None, hints[f.name], f.metadata))
    inverse = {v: k for k, v in getattr(cls, "ALIASES", {}).items()}
    return option_names(cls), inverse, checked


def as_dict(options: Any) -> dict[str, Any]:
    """The dataclass as a plain mapping under its user-facing keys (aliases applied)."""
    aliases = getattr(type(options), "ALIASES", {})
    return {aliases.get(k, k): v for k, v in dataclasses.asdict(options).items()}


def field_at(cls: type, path: str) -> dataclasses.Field | None:
    """The knob a dotted key names in the nested dataclass ``cls``; None inside a free-form mapping
    (a ``dict`` field). ConfigError for a key that is not there or names a whole section."""
    node: Any = cls
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            raise KeyError(path)
        field = fields[part]
        kind, _ = _split_optional(_hints(node)[part])
        if dataclasses.is_dataclass(kind):
            node = kind
            if i == len(parts) - 1:
                first = dataclasses.fields(kind)[0].name
                raise ConfigError(f"'{path}' is a section; override one of its keys, e.g. '{path}.{first}'")
            continue
        if i < len(parts) - 1:
            if typing.get_origin(kind) is dict or kind is dict:
                return None  # a key inside a free-form mapping: its owner checks it
            raise KeyError(path)
        return field
    return None


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted knob key of the nested dataclass ``cls`` (for did-you-mean)."""
    keys = []
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        kind, _ = _split_optional(_hints(cls)[f.name])
        keys.extend(all_keys(kind, full) if dataclasses.is_dataclass(kind) else [full])
    return keys
