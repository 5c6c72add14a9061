"""Table of the alignment study: final class-IL ACC of the RanPAC head and of the (aligned or not) linear
head, task-aware ACC and upstream retention, mean ± sample std over the seeds that finished.

Rows group run folders by their id without the seed; the recorded "neither" runs of the equal-budget study
(RanPAC head, same config; its first recording, kept in study_runs/ from commit 202db2d since
benchmarks/study/ was re-recorded without the RanPAC head) are read alongside.
Run:  python benchmarks/alignment/summarize.py > benchmarks/alignment/summary.md
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = {"alignment": HERE / "runs", "study": HERE / "study_runs"}  # row label: run folders


def _fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def main() -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for label, root in SOURCES.items():
        for path in sorted(root.glob("*/results.json")):
            name = path.parent.name
            data = json.loads(path.read_text())
            if data.get("status") != "finished":
                continue
            key = re.sub(r"-s\d+$", "", name)
            groups[f"{label}: {key}"].append(data)
    print("| runs | seeds | ACC, RanPAC head | ACC, linear head | TIL ACC | upstream retention | train s (mean) |")
    print("|---|---|---|---|---|---|---|")
    for key, runs in sorted(groups.items()):
        acc = [r["metrics"]["acc"] for r in runs]
        linear = [r["heads"]["linear"]["metrics"]["acc"] for r in runs if "linear" in r.get("heads", {})]
        til = [r["metrics"]["til_acc"] for r in runs]
        retention = [r["upstream"]["retention"] for r in runs if r.get("upstream")]
        train = statistics.fmean(r["timing"]["train_s"] for r in runs)
        print(
            f"| {key} | {len(runs)} | {_fmt(acc)} | {_fmt(linear)} | {_fmt(til)} | "
            f"{_fmt(retention, 1.0, 3)} | {train:.0f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
