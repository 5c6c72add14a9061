"""The report table: grouping runs over seeds, the CSV columns, the Markdown table and report.md."""

from __future__ import annotations

import csv
import io
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...safeio import write_text_nofollow
from .runs import REPORT_METRICS, Run, mean

SUBSPACE_COLUMNS: tuple[str, ...] = ("overlap_mean", "input_overlap_mean", "alignment_mean", "final_feature_drift")
UPSTREAM_COLUMNS: tuple[str, ...] = (
    "upstream_acc_mean",
    "upstream_acc_std",
    "upstream_retention_mean",
    "upstream_retention_std",
)

# The CSV always has every column (empty cells where a value is missing) so that tools reading several
# reports see one stable schema; the Markdown table drops the subspace columns when no run has them.
CSV_COLUMNS: tuple[str, ...] = (
    "method",
    "options",
    "strategy",
    "head",
    "status",
    "seeds",
    "seed_list",
    *(f"{metric}_{stat}" for metric in REPORT_METRICS for stat in ("mean", "std")),
    "trainable_params",
    "train_s_mean",
    "linear_acc_mean",
    "linear_acc_std",
    *UPSTREAM_COLUMNS,
    *SUBSPACE_COLUMNS,
    "error",
    "run_ids",
)

_MARKDOWN_ERROR_CHARS = 120  # the full error stays in the CSV and in report.md's "Failed runs" section


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Format rows as returned by :func:`build_report` as a Markdown table (accuracies in %)."""
    with_subspace = any(row.get(column) is not None for row in rows for column in SUBSPACE_COLUMNS)
    with_linear = any(row.get("linear_acc_mean") is not None for row in rows)
    with_upstream = any(row.get(column) is not None for row in rows for column in UPSTREAM_COLUMNS)
    headers = ["Method", "Options", "Strategy", "Head", "Seeds", "ACC (%)", "Avg-inc ACC (%)", "BWT (%)"]
    headers += ["Forgetting (%)", "Max-forgetting (%)", "TIL ACC (%)", "TIL forgetting (%)", "Trainable params"]
    headers += ["Train time (s)"]
    if with_linear:
        headers.append("Linear-head ACC (%)")
    if with_upstream:
        headers += ["Upstream acc (%)", "Upstream retention"]
    if with_subspace:
        headers += ["Overlap", "Input overlap", "Alignment", "Final drift"]
    headers.append("Status")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [str(row.get("method", "")), row.get("options") or "-", str(row.get("strategy", ""))]
        cells += [str(row.get("head") or "linear"), str(row.get("seeds", ""))]
        cells += [_percent(row.get(f"{m}_mean"), row.get(f"{m}_std")) for m in REPORT_METRICS]
        params = row.get("trainable_params")
        cells.append(f"{params:,}" if params is not None else "n/a")
        cells.append(_number_cell(row.get("train_s_mean"), ".1f"))
        if with_linear:
            cells.append(_percent(row.get("linear_acc_mean"), row.get("linear_acc_std")))
        if with_upstream:
            cells += [
                _percent(row.get("upstream_acc_mean"), row.get("upstream_acc_std")),
                _plus_minus(row.get("upstream_retention_mean"), row.get("upstream_retention_std"), ".3f"),
            ]
        if with_subspace:
            cells += [_number_cell(row.get(column), ".3f") for column in SUBSPACE_COLUMNS]
        if row.get("status") == "failed":
            cells.append(f"**failed**: {_shorten(str(row.get('error') or ''), _MARKDOWN_ERROR_CHARS)}")
        else:
            cells.append("ok")
        lines.append("| " + " | ".join(markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def aggregate(runs: list[Run]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str, str], list[Run]] = {}
    for run in runs:
        if run.status == "finished":
            groups.setdefault(run.key, []).append(run)
    rows = [_group_row(key, members) for key, members in groups.items()]
    rows += [_failed_row(run) for run in runs if run.status == "failed"]
    # Finished row first, then the failed runs of the same configuration right below it.
    rows.sort(
        key=lambda r: (
            r["method"],
            natural_key(r["options"]),
            r["strategy"],
            r["head"],
            r["status"] != "finished",
            r["run_ids"],
        )
    )
    return rows


def natural_key(text: str) -> tuple:
    """Sort key reading digit runs as numbers: rank=4 before rank=16."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text or ""))


def _empty_row(key: tuple[str, str, str, str], status: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS)
    row.update(method=key[0], options=key[1], strategy=key[2], head=key[3], status=status, error="")
    return row


def _group_row(key: tuple[str, str, str, str], members: list[Run]) -> dict[str, Any]:
    row = _empty_row(key, "finished")
    members = sorted(members, key=lambda r: (r.seed is None, r.seed or 0, r.run_id))
    row["seeds"] = len(members)
    row["seed_list"] = ";".join(str(r.seed) for r in members if r.seed is not None)
    row["run_ids"] = ";".join(r.run_id for r in members)
    for metric in REPORT_METRICS:
        row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r.metrics.get(metric) for r in members])
    trainable = mean([r.trainable for r in members if r.trainable is not None])
    row["trainable_params"] = round(trainable) if trainable is not None else None
    row["train_s_mean"] = mean([r.train_s for r in members if r.train_s is not None])
    row["overlap_mean"] = mean([r.overlap for r in members if r.overlap is not None])
    row["input_overlap_mean"] = mean([r.input_overlap for r in members if r.input_overlap is not None])
    row["alignment_mean"] = mean([r.alignment for r in members if r.alignment is not None])
    row["final_feature_drift"] = mean([r.final_drift for r in members if r.final_drift is not None])
    row["linear_acc_mean"], row["linear_acc_std"] = _mean_std([r.linear_acc for r in members])
    final_upstream = [r.upstream[-1] if r.upstream else None for r in members]
    row["upstream_acc_mean"], row["upstream_acc_std"] = _mean_std(final_upstream)
    row["upstream_retention_mean"], row["upstream_retention_std"] = _mean_std([r.upstream_retention for r in members])
    return row


def _failed_row(run: Run) -> dict[str, Any]:
    row = _empty_row(run.key, "failed")
    row["seeds"] = 1
    row["seed_list"] = str(run.seed) if run.seed is not None else ""
    row["run_ids"] = run.run_id
    row["error"] = run.error
    return row


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) of the measured values; std is 0.0 for one value."""
    measured = [v for v in values if v is not None]
    if not measured:
        return None, None
    return statistics.fmean(measured), statistics.stdev(measured) if len(measured) > 1 else 0.0


def write_csv(rows: list[dict[str, Any]], path: Path, *, root: Path | None = None) -> None:
    """Write the rows to ``path`` atomically, never through a symbolic link below ``root`` (see safeio)."""
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in CSV_COLUMNS})
    write_text_nofollow(path, handle.getvalue(), root=root)


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection); text from results
# files (method names, options, errors) gets a leading apostrophe, which spreadsheets show as plain text.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def markdown_report(
    rows: list[dict[str, Any]],
    runs: list[Run],
    root: Path,
    out: Path,
    plot_files: list[Path],
    sections: Sequence[str] = (),
) -> str:
    """report.md: the table, the hardware, ``sections`` (lines: the statistics, report/claims.py), failures, plots."""
    failed = [run for run in runs if run.status == "failed"]
    lines = [
        "# Continual-learning results",
        "",
        f"{len(runs)} runs read from `{root}` ({len(runs) - len(failed)} finished, {len(failed)} failed).",
        "Accuracy metrics are percentages, shown as mean ± sample standard deviation over seeds; failed",
        "runs are excluded from the averages. Metric definitions: `avl_peft.instruments.metrics`.",
        "",
        format_table(rows),
        "",
        *_hardware_lines(runs),
        *sections,
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


def _hardware_lines(runs: list[Run]) -> list[str]:
    """Where the numbers come from: each machine (and resolved precision) once, with its run count."""
    seen: dict[tuple[str, str], int] = {}
    for run in runs:
        if run.hardware is not None:
            key = (run.hardware, run.precision or "?")
            seen[key] = seen.get(key, 0) + 1
    if not seen:
        return []
    lines = [
        f"{markdown_cell(machine)}; precision {markdown_cell(precision)} ({count} run{'s' * (count != 1)})"
        for (machine, precision), count in sorted(seen.items())
    ]
    if len(lines) == 1:
        return [f"Hardware: {lines[0]}.", ""]
    return ["Hardware (the runs differ; compare times within one machine only):", "", *[f"- {x}" for x in lines], ""]


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _scaled(fraction: float | None) -> float | None:
    return None if fraction is None else fraction * 100


def _percent(mean: float | None, std: float | None) -> str:
    return _plus_minus(_scaled(mean), _scaled(std), ".1f")


def _plus_minus(mean: float | None, std: float | None, spec: str) -> str:
    if mean is None:
        return "n/a"
    return f"{format(mean, spec)} ± {format(std or 0.0, spec)}"


def _number_cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown_cell(text: str) -> str:
    """A table cell: pipes escaped, line breaks flattened (run ids and labels come from user configs)."""
    return text.replace("|", "\\|").replace("\n", " ")
