"""Reading one run's results.json into the fields the report uses; a bad file is skipped, never fatal."""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import AvlPeftError, DataError
from ...hardware import describe
from ...instruments.metrics import MATRIX_KINDS, summarize, summarize_both
from ...validate import is_int, is_number
from .. import results

# Metrics averaged over seeds; all are fractions in results.json and shown as percentages in Markdown.
REPORT_METRICS: tuple[str, ...] = (
    "acc",
    "avg_incremental_acc",
    "bwt",
    "forgetting",
    "max_forgetting",
    "til_acc",
    "til_forgetting",
)


class CorruptResults(Exception):
    """A results.json that cannot be used; the message says why (turned into a warning, never raised)."""


@dataclass
class Run:
    path: Path
    run_id: str
    method: str
    options: str
    strategy: str
    seed: int | None
    status: str
    error: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    trainable: int | None = None
    train_s: float | None = None
    overlap: float | None = None
    input_overlap: float | None = None  # row-space (input-side) overlap: what interference control constrains
    alignment: float | None = None
    final_drift: float | None = None
    matrices: dict[str, Any] = field(default_factory=dict)
    head: str = "linear"  # the classifier behind the class-incremental numbers
    linear_acc: float | None = None  # the trained linear head's class-IL ACC when a statistics head was used
    upstream: list[float] | None = None  # upstream accuracy before training and after each experience
    upstream_retention: float | None = None
    precision: str | None = None  # training.precision as the run resolved it (auto -> bf16/fp32)
    hardware: str | None = None  # one line describing the machine (avl_peft.hardware.describe), load left out
    search: dict[str, Any] | None = None  # the validation search's block (study.search), if the run had one

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.method, self.options, self.strategy, self.head)


def load_run(path: Path) -> Run:
    try:
        data = results.read(path)
    except DataError as exc:
        raise CorruptResults(str(exc).removeprefix(f"{path}: ")) from None
    status = data["status"]

    run = data.get("run")
    if not isinstance(run, dict):
        raise CorruptResults("'run' is missing or not an object")
    method, strategy = run.get("method"), run.get("strategy")
    for key, value in (("method", method), ("strategy", strategy)):
        if not isinstance(value, str) or not value:
            raise CorruptResults(f"'run.{key}' is missing or not a string")
    seed = run.get("seed")
    if seed is not None and not is_int(seed):
        raise CorruptResults(f"'run.seed' is {seed!r}, expected an integer")
    options = run.get("options") or {}
    if not isinstance(options, dict):
        raise CorruptResults("'run.options' is not an object")
    if run.get("policy") not in (None, "continue"):  # another lifecycle is another configuration
        options = {**options, "policy": run["policy"]}
    # The folder name is the natural fallback id: runners name run folders after the run id.
    run_id = str(run.get("id") or path.parent.name)

    result = Run(
        path=path,
        run_id=run_id,
        method=method,
        options=_format_options(options),
        strategy=strategy,
        seed=seed,
        status=status,
    )
    if status == "failed":
        # Failed runs are reported with their error only; whatever partial numbers they hold are not
        # comparable with finished runs, so they are not read.
        result.error = str(data.get("error") or "no error message recorded")
        return result

    matrices = data.get("accuracy_matrix")
    result.matrices = matrices if isinstance(matrices, dict) else {}
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        metrics = _metrics_from_matrices(result.matrices)
    result.metrics = {name: _number(metrics.get(name), f"metrics.{name}") for name in REPORT_METRICS}

    params = _section(data, "params")
    trainable = _number(params.get("trainable"), "params.trainable")
    if trainable is not None and not 0 <= trainable <= 1e15:  # no model has more; the mean must stay finite
        raise CorruptResults(f"'params.trainable' is {trainable!r}, expected a count between 0 and 10^15")
    result.trainable = round(trainable) if trainable is not None else None
    result.train_s = _number(_section(data, "timing").get("train_s"), "timing.train_s")
    _read_subspace(data.get("subspace"), result)
    _read_heads(data.get("heads"), result)
    _read_upstream(data.get("upstream"), result)
    if isinstance(data.get("precision"), str):
        result.precision = data["precision"][:16]
    if isinstance(data.get("search"), dict):
        result.search = data["search"]
    if isinstance(data.get("hardware"), dict):
        result.hardware = describe(data["hardware"], load=False)[:300]
    return result


def _read_heads(heads: Any, run: Run) -> None:
    """Schema 2: which head produced the class-IL numbers; a statistics head also keeps the linear ACC."""
    if heads is None:
        return
    if not isinstance(heads, dict) or not isinstance(heads.get("class_incremental"), str):
        raise CorruptResults("'heads' is not an object naming its 'class_incremental' head")
    run.head = heads["class_incremental"]
    linear = heads.get("linear")
    if isinstance(linear, dict) and isinstance(linear.get("metrics"), dict):
        run.linear_acc = _number(linear["metrics"].get("acc"), "heads.linear.metrics.acc")


def _read_upstream(upstream: Any, run: Run) -> None:
    if upstream is None:
        return
    if not isinstance(upstream, dict) or not isinstance(upstream.get("acc"), list) or not upstream["acc"]:
        raise CorruptResults("'upstream' is not an object with a non-empty 'acc' list")
    values = [_number(v, "upstream.acc[]") for v in upstream["acc"]]
    run.upstream = [v if v is not None else float("nan") for v in values]
    run.upstream_retention = _number(upstream.get("retention"), "upstream.retention")


def _metrics_from_matrices(matrices: dict[str, Any]) -> dict[str, float]:
    """Recompute the metrics of a finished run whose results.json has matrices but no 'metrics' block."""
    if "class_incremental" not in matrices:
        raise CorruptResults("a finished run needs 'metrics' or 'accuracy_matrix.class_incremental'")
    try:
        if all(kind in matrices for kind in MATRIX_KINDS):
            return summarize_both({kind: matrices[kind] for kind in MATRIX_KINDS})
        return summarize(matrices["class_incremental"])  # no task-aware matrix: til_* stay missing
    except AvlPeftError as exc:
        raise CorruptResults(f"no 'metrics' and the accuracy matrix is invalid: {exc}") from exc


def _read_subspace(entries: Any, run: Run) -> None:
    if entries is None:
        return
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise CorruptResults("'subspace' is not a list of objects")
    if not entries:
        return
    # A base session (full fine-tuning of experience 0) is not the method's update: leave it out of the
    # method's averages; the final drift still counts from the pretrained features.
    adapted = [e for e in entries if not e.get("base_session")] or entries
    overlaps = [_number(e.get("overlap"), "subspace[].overlap") for e in adapted]
    alignments = [_number(e.get("alignment"), "subspace[].alignment") for e in adapted]
    run.overlap = mean([v for v in overlaps if v is not None])
    inputs = [_number(e.get("input_overlap"), "subspace[].input_overlap") for e in adapted]
    run.input_overlap = mean([v for v in inputs if v is not None])
    run.alignment = mean([v for v in alignments if v is not None])
    # "Final" means the last experience, taken by its index rather than list order in case a writer
    # appended entries out of order; entries without an index rank below indexed ones, ties by position.
    order = [(_number(e.get("experience"), "subspace[].experience"), position) for position, e in enumerate(entries)]
    _, last = max((index if index is not None else -math.inf, position) for index, position in order)
    run.final_drift = _number(entries[last].get("feature_drift"), "subspace[].feature_drift")


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CorruptResults(f"'{key}' is not an object")
    return value


def _number(value: Any, where: str) -> float | None:
    """A finite float, or None for null/NaN (not measured); anything else makes the file unusable."""
    if value is None:
        return None
    if not is_number(value):
        raise CorruptResults(f"'{where}' is {value!r}, expected a number")
    value = float(value)
    return value if math.isfinite(value) else None


def _format_options(options: Mapping[str, Any]) -> str:
    """Compact, order-independent label for the method options, e.g. ``alpha=16,rank=8``."""
    parts = []
    for key in sorted(options):
        value = options[key]
        if isinstance(value, (dict, list)):
            text = json.dumps(value, separators=(",", ":"), sort_keys=True)
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    return ",".join(parts)


def warn_duplicate_ids(runs: list[Run]) -> None:
    seen: dict[str, Path] = {}
    for run in runs:
        if run.run_id in seen:
            warnings.warn(
                f"run id '{run.run_id}' appears in both {seen[run.run_id]} and {run.path}; "
                "both are counted, which double-counts a seed if one is a copy of the other",
                stacklevel=3,
            )
        else:
            seen[run.run_id] = run.path


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None
