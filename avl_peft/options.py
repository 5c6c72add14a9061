"""One mechanism for options: a frozen-or-not dataclass per method, strategy, head and scenario family,
built from a mapping by :func:`parse_options`, which turns unknown keys into a did-you-mean ConfigError.
Each dataclass checks its own values in ``__post_init__`` with :mod:`avl_peft.validate`."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .errors import ConfigError
from .registry import suggest

T = TypeVar("T")


def option_names(cls: type) -> list[str]:
    """The keys users write for ``cls``: its fields, under their ``ALIASES`` spelling where one exists
    (e.g. ``lambda`` for ``orth_lambda``, a Python keyword)."""
    aliases = getattr(cls, "ALIASES", {})
    return [aliases.get(f.name, f.name) for f in dataclasses.fields(cls)]


def parse_options(cls: type[T], owner: str, options: Any) -> T:
    """``cls(**options)`` with every key checked first; ``owner`` names whose options these are."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(f"{owner}: options must be a mapping of names to values, got {type(options).__name__}")
    allowed = option_names(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    inverse = {v: k for k, v in getattr(cls, "ALIASES", {}).items()}
    kwargs = {}
    for key, value in options.items():
        if not isinstance(key, str) or (key not in allowed and key not in fields):
            raise ConfigError(
                f"{owner} has no option '{key}'. Allowed: {', '.join(allowed) or '(none)'}.{suggest(str(key), allowed)}"
            )
        field = inverse.get(key, key)
        if field in kwargs:
            raise ConfigError(f"{owner}: give '{key}' or '{field}', not both")
        kwargs[field] = value
    return cls(**kwargs)


def as_dict(options: Any) -> dict[str, Any]:
    """The dataclass as a plain mapping under its user-facing keys (aliases applied)."""
    aliases = getattr(type(options), "ALIASES", {})
    return {aliases.get(k, k): v for k, v in dataclasses.asdict(options).items()}
