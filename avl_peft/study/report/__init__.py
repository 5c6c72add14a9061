"""Aggregate the ``results.json`` files of many runs into a Markdown/CSV report and plots.

:func:`build_report` reads every ``results.json`` (format: :mod:`avl_peft.study.results`) under a folder,
recursively, groups the runs by
``(method, options, strategy)`` across seeds and writes, in the output folder:

* ``report.csv``: one row per group with raw numbers (fractions, not percentages): the mean and the sample
  standard deviation over seeds of each metric (``acc_mean``, ``acc_std``, ...; std is 0 for one seed),
  trainable parameters, mean training time and, where the runs logged subspace diagnostics, the mean
  overlap, mean alignment and final-experience feature drift;
* ``report.md``: the same table formatted by :func:`format_table` (accuracies as percentages) and, with
  ≥ 2 seeds, the statistics sections of :mod:`.claims` (95 % bootstrap intervals, paired comparisons, the
  verdicts on the ``claims`` of the study's ``study.yaml``) and the values a validation search chose;
* ``plots/acc_matrix_<run-id>.png``: one accuracy-matrix heatmap per finished run (beyond 20 experiences with
  the average accuracy per step, the final accuracy and the forgetting per task plotted below it);
* ``plots/forgetting_vs_params.png``: forgetting against trainable parameters, one colour per method;
* ``plots/forgetting_vs_overlap.png`` and ``plots/forgetting_vs_alignment.png`` when subspace data exist.

Writes never follow a symbolic link below the output folder (a planted ``report.md`` link is replaced, a
linked ``plots/`` refused); heatmaps of huge matrices are drawn at a capped figure size.

Failed runs get a row of their own (status ``failed`` plus the error) and are left out of the averages.
A ``results.json`` that cannot be read or does not follow the schema is skipped with a one-line warning
naming it, so one broken run does not hide the others. Text from results files is written literally:
``report.csv`` cells that a spreadsheet would run as a formula (a leading ``=``, ``+``, ``-``, ``@``, tab
or carriage return) get a leading apostrophe, and plots draw ``$`` as a dollar sign, not as mathtext.
Metric definitions are in :mod:`avl_peft.instruments.metrics`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ...errors import AvlPeftError, DataError
from ...safeio import load_yaml, write_text_nofollow
from .. import results
from .claims import check_claims, statistics_sections
from .plots import write_plots
from .runs import REPORT_METRICS, CorruptResults, Run, load_run, warn_duplicate_ids
from .table import CSV_COLUMNS, SUBSPACE_COLUMNS, aggregate, format_table, markdown_report, write_csv

__all__ = ["CSV_COLUMNS", "REPORT_METRICS", "SUBSPACE_COLUMNS", "build_report", "format_table"]


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
    # A search's trials (run folders below search-trials/) are not runs of the study.
    paths = sorted(p for p in root.rglob(results.FILENAME) if p.is_file() and results.TRIALS not in p.parts)
    if not paths:
        raise DataError(
            f"no {results.FILENAME} found under '{root}' (searched recursively); "
            "run some experiments first or pass the folder they wrote their results to"
        )

    runs: list[Run] = []
    for path in paths:
        try:
            runs.append(load_run(path))
        except CorruptResults as exc:
            warnings.warn(f"skipping {path}: {exc}", stacklevel=2)
        except Exception as exc:  # a results file of any shape: one bad run must not hide the others
            warnings.warn(
                f"skipping {path}: it does not follow the results schema ({type(exc).__name__})", stacklevel=2
            )
    if not runs:
        raise DataError(
            f"none of the {len(paths)} {results.FILENAME} files under '{root}' could be read "
            "(see the warnings for each file)"
        )
    warn_duplicate_ids(runs)

    rows = aggregate(runs)
    out = Path(out_dir) if out_dir is not None else root
    # Every file goes through safeio's no-follow writes rooted at the output folder: a report.md, report.csv,
    # plots/ or plot planted there as a symbolic link is replaced or refused, never written through.
    plot_files = write_plots(runs, rows, out / "plots", root=out)
    write_csv(rows, out / "report.csv", root=out)
    sections = statistics_sections(runs, study_claims(root))
    write_text_nofollow(out / "report.md", markdown_report(rows, runs, root, out, plot_files, sections), root=out)
    return rows


def study_claims(root: Path) -> list[dict]:
    """The ``claims`` of the study whose runs are under ``root`` (its ``study.yaml``, written by the runner)."""
    path = root / "study.yaml"
    if not path.is_file():
        return []
    try:
        claims = (load_yaml(path, what="study file") or {}).get("claims") or []
        check_claims(claims)
    except (AvlPeftError, AttributeError) as exc:
        warnings.warn(f"{path}: its claims are not judged ({exc})", stacklevel=2)
        return []
    return claims
