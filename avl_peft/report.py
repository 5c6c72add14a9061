"""Aggregate the ``results.json`` files of many runs into a Markdown/CSV report and plots.

:func:`build_report` reads every ``results.json`` (schema 1) under a folder, recursively, groups the runs by
``(method, options, strategy)`` across seeds and writes, in the output folder:

* ``report.csv``: one row per group with raw numbers (fractions, not percentages): the mean and the sample
  standard deviation over seeds of each metric (``acc_mean``, ``acc_std``, ...; std is 0 for one seed),
  trainable parameters, mean training time and, where the runs logged subspace diagnostics, the mean
  overlap, mean alignment and final-experience feature drift;
* ``report.md``: the same table formatted by :func:`format_table` (accuracies as percentages);
* ``plots/acc_matrix_<run-id>.png``: one accuracy-matrix heatmap per finished run;
* ``plots/forgetting_vs_params.png``: forgetting against trainable parameters, one colour per method;
* ``plots/forgetting_vs_overlap.png`` and ``plots/forgetting_vs_alignment.png`` when subspace data exist.

Failed runs get a row of their own (status ``failed`` plus the error) and are left out of the averages.
A ``results.json`` that cannot be read or does not follow the schema is skipped with a warning, so one
broken run does not hide the others. Metric definitions are in :mod:`avl_peft.metrics`.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AvlPeftError, DataError
from .metrics import MATRIX_KINDS, summarize, summarize_both, validate_matrix

SCHEMA_VERSION = 1
RESULTS_FILENAME = "results.json"
STATUSES = ("finished", "failed")

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
SUBSPACE_COLUMNS: tuple[str, ...] = ("overlap_mean", "alignment_mean", "final_feature_drift")

# The CSV always has every column (empty cells where a value is missing) so that tools reading several
# reports see one stable schema; the Markdown table drops the subspace columns when no run has them.
CSV_COLUMNS: tuple[str, ...] = (
    "method",
    "options",
    "strategy",
    "status",
    "seeds",
    "seed_list",
    *(f"{metric}_{stat}" for metric in REPORT_METRICS for stat in ("mean", "std")),
    "trainable_params",
    "train_s_mean",
    *SUBSPACE_COLUMNS,
    "error",
    "run_ids",
)

_MARKDOWN_ERROR_CHARS = 120  # the full error stays in the CSV and in report.md's "Failed runs" section


class _CorruptResults(Exception):
    """A results.json that cannot be used; the message says why (turned into a warning, never raised)."""


@dataclass
class _Run:
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
    alignment: float | None = None
    final_drift: float | None = None
    matrices: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.method, self.options, self.strategy)


# --------------------------------------------------------------------------------------------- public API


def build_report(run_dir_root: str | Path, out_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Read every results.json under ``run_dir_root`` and write report.md, report.csv and plots/.

    The files go to ``out_dir`` (created if needed; default: ``run_dir_root``). Returns the table rows as
    dicts keyed by :data:`CSV_COLUMNS` holding raw numbers (None where a value is missing), sorted by
    method, options and strategy. Raises DataError when the folder does not exist or holds no readable
    results.json; unreadable or malformed files are skipped with a warning naming them.
    """
    root = Path(run_dir_root)
    if not root.is_dir():
        raise DataError(
            f"run folder '{root}' does not exist or is not a folder; pass the folder the runs were written to"
        )
    paths = sorted(p for p in root.rglob(RESULTS_FILENAME) if p.is_file())
    if not paths:
        raise DataError(
            f"no {RESULTS_FILENAME} found under '{root}' (searched recursively); "
            "run some experiments first or pass the folder they wrote their results to"
        )

    runs: list[_Run] = []
    for path in paths:
        try:
            runs.append(_load_run(path))
        except _CorruptResults as exc:
            warnings.warn(f"skipping {path}: {exc}", stacklevel=2)
    if not runs:
        raise DataError(
            f"none of the {len(paths)} {RESULTS_FILENAME} files under '{root}' could be read "
            "(see the warnings for each file)"
        )
    _warn_duplicate_ids(runs)

    rows = _aggregate(runs)
    out = Path(out_dir) if out_dir is not None else root
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_files = _write_plots(runs, rows, plots_dir)
    _write_csv(rows, out / "report.csv")
    (out / "report.md").write_text(_markdown_report(rows, runs, root, out, plot_files), encoding="utf-8")
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Format rows as returned by :func:`build_report` as a Markdown table (accuracies in %)."""
    with_subspace = any(row.get(column) is not None for row in rows for column in SUBSPACE_COLUMNS)
    headers = ["Method", "Options", "Strategy", "Seeds", "ACC (%)", "Avg-inc ACC (%)", "BWT (%)"]
    headers += ["Forgetting (%)", "Max-forgetting (%)", "TIL ACC (%)", "TIL forgetting (%)", "Trainable params"]
    headers += ["Train time (s)"]
    if with_subspace:
        headers += ["Overlap", "Alignment", "Final drift"]
    headers.append("Status")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [str(row.get("method", "")), row.get("options") or "-", str(row.get("strategy", ""))]
        cells.append(str(row.get("seeds", "")))
        cells += [_percent(row.get(f"{m}_mean"), row.get(f"{m}_std")) for m in REPORT_METRICS]
        params = row.get("trainable_params")
        cells.append(f"{params:,}" if params is not None else "n/a")
        cells.append(_number_cell(row.get("train_s_mean"), ".1f"))
        if with_subspace:
            cells += [_number_cell(row.get(column), ".3f") for column in SUBSPACE_COLUMNS]
        if row.get("status") == "failed":
            cells.append(f"**failed**: {_shorten(str(row.get('error') or ''), _MARKDOWN_ERROR_CHARS)}")
        else:
            cells.append("ok")
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ reading runs


def _load_run(path: Path) -> _Run:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _CorruptResults(f"cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _CorruptResults("the top level is not a JSON object")
    if data.get("schema") != SCHEMA_VERSION:
        raise _CorruptResults(f"unsupported schema {data.get('schema')!r} (this version reads {SCHEMA_VERSION})")
    status = data.get("status")
    if status not in STATUSES:
        raise _CorruptResults(f"'status' is {status!r}, expected one of {list(STATUSES)}")

    run = data.get("run")
    if not isinstance(run, dict):
        raise _CorruptResults("'run' is missing or not an object")
    method, strategy = run.get("method"), run.get("strategy")
    for key, value in (("method", method), ("strategy", strategy)):
        if not isinstance(value, str) or not value:
            raise _CorruptResults(f"'run.{key}' is missing or not a string")
    seed = run.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _CorruptResults(f"'run.seed' is {seed!r}, expected an integer")
    options = run.get("options") or {}
    if not isinstance(options, dict):
        raise _CorruptResults("'run.options' is not an object")
    # The folder name is the natural fallback id: runners name run folders after the run id.
    run_id = str(run.get("id") or path.parent.name)

    result = _Run(
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
    result.trainable = round(trainable) if trainable is not None else None
    result.train_s = _number(_section(data, "timing").get("train_s"), "timing.train_s")
    _read_subspace(data.get("subspace"), result)
    return result


def _metrics_from_matrices(matrices: dict[str, Any]) -> dict[str, float]:
    """Recompute the metrics of a finished run whose results.json has matrices but no 'metrics' block."""
    if "class_incremental" not in matrices:
        raise _CorruptResults("a finished run needs 'metrics' or 'accuracy_matrix.class_incremental'")
    try:
        if all(kind in matrices for kind in MATRIX_KINDS):
            return summarize_both({kind: matrices[kind] for kind in MATRIX_KINDS})
        return summarize(matrices["class_incremental"])  # no task-aware matrix: til_* stay missing
    except AvlPeftError as exc:
        raise _CorruptResults(f"no 'metrics' and the accuracy matrix is invalid: {exc}") from exc


def _read_subspace(entries: Any, run: _Run) -> None:
    if entries is None:
        return
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise _CorruptResults("'subspace' is not a list of objects")
    if not entries:
        return
    # A base session (full fine-tuning of experience 0) is not the method's update: leave it out of the
    # method's averages; the final drift still counts from the pretrained features.
    adapted = [e for e in entries if not e.get("base_session")] or entries
    overlaps = [_number(e.get("overlap"), "subspace[].overlap") for e in adapted]
    alignments = [_number(e.get("alignment"), "subspace[].alignment") for e in adapted]
    run.overlap = _mean([v for v in overlaps if v is not None])
    run.alignment = _mean([v for v in alignments if v is not None])
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
        raise _CorruptResults(f"'{key}' is not an object")
    return value


def _number(value: Any, where: str) -> float | None:
    """A finite float, or None for null/NaN (not measured); anything else makes the file unusable."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _CorruptResults(f"'{where}' is {value!r}, expected a number")
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


def _warn_duplicate_ids(runs: list[_Run]) -> None:
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


# ------------------------------------------------------------------------------------------- aggregation


def _aggregate(runs: list[_Run]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[_Run]] = {}
    for run in runs:
        if run.status == "finished":
            groups.setdefault(run.key, []).append(run)
    rows = [_group_row(key, members) for key, members in groups.items()]
    rows += [_failed_row(run) for run in runs if run.status == "failed"]
    # Finished row first, then the failed runs of the same configuration right below it.
    rows.sort(key=lambda r: (r["method"], r["options"], r["strategy"], r["status"] != "finished", r["run_ids"]))
    return rows


def _empty_row(key: tuple[str, str, str], status: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS)
    row.update(method=key[0], options=key[1], strategy=key[2], status=status, error="")
    return row


def _group_row(key: tuple[str, str, str], members: list[_Run]) -> dict[str, Any]:
    row = _empty_row(key, "finished")
    members = sorted(members, key=lambda r: (r.seed is None, r.seed or 0, r.run_id))
    row["seeds"] = len(members)
    row["seed_list"] = ";".join(str(r.seed) for r in members if r.seed is not None)
    row["run_ids"] = ";".join(r.run_id for r in members)
    for metric in REPORT_METRICS:
        row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r.metrics.get(metric) for r in members])
    trainable = _mean([r.trainable for r in members if r.trainable is not None])
    row["trainable_params"] = round(trainable) if trainable is not None else None
    row["train_s_mean"] = _mean([r.train_s for r in members if r.train_s is not None])
    row["overlap_mean"] = _mean([r.overlap for r in members if r.overlap is not None])
    row["alignment_mean"] = _mean([r.alignment for r in members if r.alignment is not None])
    row["final_feature_drift"] = _mean([r.final_drift for r in members if r.final_drift is not None])
    return row


def _failed_row(run: _Run) -> dict[str, Any]:
    row = _empty_row(run.key, "failed")
    row["seeds"] = 1
    row["seed_list"] = str(run.seed) if run.seed is not None else ""
    row["run_ids"] = run.run_id
    row["error"] = run.error
    return row


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) of the measured values; std is 0.0 for one value."""
    measured = [v for v in values if v is not None]
    if not measured:
        return None, None
    return statistics.fmean(measured), statistics.stdev(measured) if len(measured) > 1 else 0.0


# --------------------------------------------------------------------------------------------- writing


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})


def _markdown_report(
    rows: list[dict[str, Any]], runs: list[_Run], root: Path, out: Path, plot_files: list[Path]
) -> str:
    failed = [run for run in runs if run.status == "failed"]
    lines = [
        "# Continual-learning results",
        "",
        f"{len(runs)} runs read from `{root}` ({len(runs) - len(failed)} finished, {len(failed)} failed).",
        "Accuracy metrics are percentages, shown as mean ± sample standard deviation over seeds; failed",
        "runs are excluded from the averages. Metric definitions: `avl_peft.metrics`.",
        "",
        format_table(rows),
        "",
    ]
    if failed:
        lines += ["## Failed runs", ""]
        for run in sorted(failed, key=lambda r: r.run_id):
            error = run.error.replace("\n", " ")
            lines.append(f"- `{run.run_id}` ({_relative(run.path, root)}): {error}")
        lines.append("")
    if plot_files:
        lines += ["## Plots", ""]
        for plot in plot_files:
            lines.append(f"![{plot.stem}]({_relative(plot, out)})")
        lines.append("")
    return "\n".join(lines)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean * 100:.1f} ± {(std or 0.0) * 100:.1f}"


def _number_cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------------------------- plots


def _write_plots(runs: list[_Run], rows: list[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """Write every plot the data allow and return their paths (summary plots first)."""
    written: list[Path] = []
    finished_rows = [row for row in rows if row["status"] == "finished"]
    scatters = [
        ("trainable_params", "trainable parameters (log scale)", "forgetting_vs_params.png", True),
        ("overlap_mean", "mean subspace overlap", "forgetting_vs_overlap.png", False),
        ("alignment_mean", "mean subspace alignment", "forgetting_vs_alignment.png", False),
    ]
    # Colours are assigned once over all methods so a method looks the same in every plot.
    methods = sorted({row["method"] for row in finished_rows})
    for x_key, x_label, filename, log_x in scatters:
        if _plot_forgetting_scatter(finished_rows, methods, x_key, x_label, plots_dir / filename, log_x):
            written.append(plots_dir / filename)

    used_names: set[str] = set()
    for run in sorted((r for r in runs if r.status == "finished"), key=lambda r: r.run_id):
        matrices = {}
        for kind in MATRIX_KINDS:
            if kind not in run.matrices:
                continue
            try:
                matrices[kind] = validate_matrix(run.matrices[kind], f"accuracy_matrix['{kind}']")
            except AvlPeftError as exc:
                warnings.warn(f"no heatmap for {kind} of {run.path}: {exc}", stacklevel=3)
        if not matrices:
            continue
        path = plots_dir / f"acc_matrix_{_unique_name(_safe_filename(run.run_id), used_names)}.png"
        _plot_accuracy_matrices(matrices, run.run_id, path)
        written.append(path)
    return written


def _safe_filename(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "run"


def _unique_name(name: str, used: set[str]) -> str:
    # Run ids should be unique, but copies of a run folder happen; never let one heatmap overwrite another.
    candidate, n = name, 2
    while candidate in used:
        candidate, n = f"{name}-{n}", n + 1
    used.add(candidate)
    return candidate


def _new_figure(width: float, height: float) -> Any:
    # An Agg canvas on a bare Figure instead of pyplot: no global backend switch in the caller's process,
    # no figure registry to leak memory through, and nothing can ever open a window.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _plot_accuracy_matrices(matrices: dict[str, np.ndarray], run_id: str, path: Path) -> None:
    import matplotlib

    size = max(m.shape[0] for m in matrices.values())
    side = max(3.5, 0.55 * size + 1.5)
    figure = _new_figure(side * len(matrices) + 1.0, side + 0.5)
    axes = figure.subplots(1, len(matrices), squeeze=False)[0]
    # Cells above the diagonal (not yet trained experiences) are NaN in validated matrices: draw them grey.
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = None
    for ax, (kind, matrix) in zip(axes, matrices.items(), strict=True):
        T = matrix.shape[0]
        image = ax.imshow(np.ma.masked_invalid(matrix * 100), vmin=0, vmax=100, cmap=cmap)
        if T <= 20:  # beyond that the numbers no longer fit in the cells
            fontsize = max(5, 10 - T // 3)
            for t in range(T):
                for i in range(t + 1):
                    value = matrix[t, i] * 100
                    colour = "white" if value < 50 else "black"  # readable on viridis' dark and light ends
                    ax.text(i, t, f"{value:.1f}", ha="center", va="center", color=colour, fontsize=fontsize)
        ax.set_title(kind.replace("_", "-"))
        ax.set_xlabel("evaluated on experience i")
        ax.set_ylabel("after training experience t")
        ticks = range(0, T, max(1, T // 10))
        ax.set_xticks(list(ticks))
        ax.set_yticks(list(ticks))
    figure.colorbar(image, ax=list(axes), label="accuracy (%)", shrink=0.8)
    figure.suptitle(f"Accuracy matrix: {run_id}")
    figure.savefig(path, dpi=100)


def _plot_forgetting_scatter(
    rows: list[dict[str, Any]], all_methods: list[str], x_key: str, x_label: str, path: Path, log_x: bool
) -> bool:
    """Forgetting (mean ± std over seeds) against one column, one colour per method; False if no data."""
    import matplotlib

    points = [
        row
        for row in rows
        if row.get(x_key) is not None
        and row.get("forgetting_mean") is not None
        and (not log_x or row[x_key] > 0)  # a log axis cannot place 0 trainable parameters
    ]
    if not points:
        return False
    methods = sorted({row["method"] for row in points})
    cmap = matplotlib.colormaps["tab10" if len(all_methods) <= 10 else "tab20"]
    figure = _new_figure(7.0, 4.5)
    ax = figure.subplots()
    for method in methods:
        mine = [row for row in points if row["method"] == method]
        ax.errorbar(
            [row[x_key] for row in mine],
            [row["forgetting_mean"] * 100 for row in mine],
            yerr=[(row["forgetting_std"] or 0.0) * 100 for row in mine],
            fmt="o",
            capsize=3,
            color=cmap(all_methods.index(method) % cmap.N),
            label=method,
        )
        for row in mine:
            label = ", ".join(part for part in (row["options"], row["strategy"]) if part)
            ax.annotate(
                label,
                (row[x_key], row["forgetting_mean"] * 100),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("forgetting, class-incremental (%)")
    ax.set_title(f"Forgetting vs {x_label.split(' (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(title="method", fontsize=8)
    figure.savefig(path, dpi=100)
    return True
