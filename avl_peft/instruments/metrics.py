"""Continual-learning summary metrics computed from an accuracy matrix ``a[t][i]`` (accuracy on experience
``i`` after training experience ``t``, a ``T x T`` matrix of fractions): acc, avg_incremental_acc, bwt,
forgetting, max_forgetting. Only the lower triangle (``i <= t``) enters any formula; entries above it may
hold anything, NaN or None included. The formulas: docs/design.md, "Metrics".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..validate import is_number

METRIC_NAMES: tuple[str, ...] = ("acc", "avg_incremental_acc", "bwt", "forgetting", "max_forgetting")
"""Keys of the dict returned by :func:`summarize`, in a stable order."""

MATRIX_KINDS: tuple[str, str] = ("class_incremental", "task_aware")
"""Keys expected by :func:`summarize_both`."""

TASK_AWARE_PREFIX = "til_"


def summarize(accuracy_matrix: Sequence[Sequence[Any]] | np.ndarray) -> dict[str, float]:
    """Compute acc, avg_incremental_acc, bwt, forgetting and max_forgetting (see the module docstring).

    ``accuracy_matrix`` is a ``T x T`` list of lists or numpy array of fractions in [0, 1].
    Raises ConfigError if it is empty, not square, not numeric, or has NaN / out-of-range values in the
    lower triangle. The values returned are plain Python floats.
    """
    return _summarize(accuracy_matrix, "accuracy_matrix")


def summarize_both(matrices: Mapping[str, Any]) -> dict[str, float]:
    """Summarize the class-incremental and the task-aware matrices of one run.

    ``matrices`` must have exactly the keys ``"class_incremental"`` and ``"task_aware"``. The
    class-incremental metrics are returned under their plain names (``acc``, ``bwt``, ...) and the
    task-aware ones with a ``til_`` prefix (``til_acc``, ``til_bwt``, ...).
    """
    if not isinstance(matrices, Mapping):
        raise ConfigError(
            f"summarize_both expects a dict with keys {list(MATRIX_KINDS)}, got {type(matrices).__name__}"
        )
    missing = [k for k in MATRIX_KINDS if k not in matrices]
    unknown = sorted(str(k) for k in matrices if k not in MATRIX_KINDS)
    if missing or unknown:
        # Unknown keys are rejected rather than ignored: a typo such as "task_awre" would otherwise
        # silently drop the task-aware metrics.
        details = []
        if missing:
            details.append(f"missing {missing}")
        if unknown:
            details.append(f"unknown {unknown}")
        raise ConfigError(f"accuracy matrices must have exactly the keys {list(MATRIX_KINDS)} ({'; '.join(details)})")
    result = _summarize(matrices["class_incremental"], "accuracy_matrix['class_incremental']")
    task_aware = _summarize(matrices["task_aware"], "accuracy_matrix['task_aware']")
    result.update({TASK_AWARE_PREFIX + name: value for name, value in task_aware.items()})
    return result


def _summarize(accuracy_matrix: Any, name: str) -> dict[str, float]:
    a = validate_matrix(accuracy_matrix, name)
    T = a.shape[0]
    last = T - 1

    acc = a[last].mean()
    avg_incremental_acc = np.mean([a[t, : t + 1].mean() for t in range(T)])
    if T == 1:
        # Nothing was trained before the only experience, so nothing can have been forgotten.
        bwt = forgetting = max_forgetting = 0.0
    else:
        diagonal = np.diag(a)[:last]
        final = a[last, :last]
        bwt = (final - diagonal).mean()
        forgetting = (diagonal - final).mean()
        best = np.array([a[i:last, i].max() for i in range(last)])  # rows t in [i, T-2]
        max_forgetting = (best - final).mean()

    values = {
        "acc": acc,
        "avg_incremental_acc": avg_incremental_acc,
        "bwt": bwt,
        "forgetting": forgetting,
        "max_forgetting": max_forgetting,
    }
    return {key: float(values[key]) for key in METRIC_NAMES}


def validate_matrix(accuracy_matrix: Sequence[Sequence[Any]] | np.ndarray, name: str = "accuracy_matrix") -> np.ndarray:
    """Return the matrix as a ``T x T`` float array with NaN above the diagonal, or raise ConfigError.

    Checks what :func:`summarize` relies on: non-empty, square, numeric, and every entry with ``i <= t``
    a number in [0, 1] (not NaN). ``name`` is used in the error messages.
    """
    if isinstance(accuracy_matrix, np.ndarray):
        if accuracy_matrix.dtype.kind not in "iuf":
            raise ConfigError(f"{name} must hold numbers, got a numpy array of dtype {accuracy_matrix.dtype}")
        if accuracy_matrix.ndim != 2:
            raise ConfigError(f"{name} must be a 2-D T x T matrix, got shape {accuracy_matrix.shape}")
        rows = accuracy_matrix.tolist()
    elif isinstance(accuracy_matrix, Sequence) and not isinstance(accuracy_matrix, (str, bytes)):
        rows = list(accuracy_matrix)
    else:
        raise ConfigError(f"{name} must be a list of lists or a numpy array, got {type(accuracy_matrix).__name__}")

    T = len(rows)
    if T == 0:
        raise ConfigError(f"{name} is empty; it needs one row per trained experience")
    for t, row in enumerate(rows):
        if not isinstance(row, (Sequence, np.ndarray)) or isinstance(row, (str, bytes)):
            raise ConfigError(f"{name} row {t} is not a list of accuracies: {row!r}")
        if len(row) != T:
            raise ConfigError(f"{name} must be square (T x T with T = {T} rows), but row {t} has {len(row)} entries")

    a = np.full((T, T), np.nan)
    for t, row in enumerate(rows):
        # Only i <= t is read by the formulas; the upper triangle is often left as NaN/None by evaluation
        # loops that skip future experiences, so it is not validated.
        for i in range(t + 1):
            value = row[i]
            if not is_number(value):
                raise ConfigError(f"{name}[{t}][{i}] must be a number, got {value!r}")
            value = float(value)
            if math.isnan(value):
                raise ConfigError(f"{name}[{t}][{i}] is NaN; every entry with i <= t must be a measured accuracy")
            if not 0.0 <= value <= 1.0:
                hint = " (it looks like a percentage: divide by 100)" if 1.0 < value <= 100.0 else ""
                raise ConfigError(f"{name}[{t}][{i}] = {value} is outside [0, 1]; accuracies are fractions{hint}")
            a[t, i] = value
    return a
