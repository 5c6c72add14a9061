"""Value checks shared by every layer: one definition of "an integer", "a finite number", "one of".

YAML and Python both hand us values whose types lie a little: ``bool`` is an ``int`` subclass (``rank:
true`` is a mistake, not 1), numpy scalars are not ``int``/``float``, and ``.nan``/``.inf`` are floats that
pass every ``<``/``>`` bound. Each check raises :class:`~avl_peft.errors.ConfigError` naming the key, what
was expected and what was given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

from .errors import ConfigError
from .registry import suggest


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), and not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (Python or numpy), and not a bool. NaN and inf count: see :func:`is_finite`."""
    return isinstance(value, Real) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(float(value))


def check_int(key: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if not is_int(value):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be <= {maximum}, got {value}")
    return value


def check_positive_int(key: str, value: Any, fix: str, maximum: int | None = None) -> int:
    """An integer >= 1 (and <= ``maximum``), for library arguments: the message ends with ``fix``."""
    if not is_int(value) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}; {fix}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be at most {maximum}, got {value!r}; {fix}")
    return int(value)


def check_number(
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    exclusive_low: bool = False,
    exclusive_high: bool = False,
) -> float:
    """A finite number within [low, high] (either end open with ``exclusive_low``/``exclusive_high``)."""
    if not is_number(value):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    below = low is not None and (value < low or (exclusive_low and value == low))
    above = high is not None and (value > high or (exclusive_high and value == high))
    if below or above:
        left, right = "(" if exclusive_low else "[", ")" if exclusive_high else "]"
        if low is not None and high is not None:
            bounds = f"in {left}{low}, {high}{right}"
        elif low is not None:
            bounds = f"{'>' if exclusive_low else '>='} {low}"
        else:
            bounds = f"{'<' if exclusive_high else '<='} {high}"
        raise ConfigError(f"{key} must be {bounds}, got {value}")
    return value


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool) and type(value).__name__ != "bool_":  # numpy.bool_ without importing numpy
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return bool(value)


def check_choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}." + suggest(str(value), list(choices))
        )
    return value


def check_finite(value: Any, key: str) -> Any:
    """Return ``value``; raise ConfigError if it is a NaN or infinite number (``.nan``, ``.inf``, ``1e999``).

    Anything else, including non-numbers, passes through: the type is the caller's to check.
    """
    if isinstance(value, Real) and not isinstance(value, Integral) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


def check_finite_tree(node: Any, key: str = "") -> None:
    """Refuse NaN and infinite numbers anywhere in nested mappings and lists (free-form options included),
    naming the dotted key (``scenario.options.ratio``, ``method.targets[2]``)."""
    if isinstance(node, dict):
        for k, v in node.items():
            check_finite_tree(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_finite_tree(v, f"{key}[{i}]")
    else:
        check_finite(node, f"{key}:")
