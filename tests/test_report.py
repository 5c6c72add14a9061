"""Tests of avl_peft.study.report on fake run folders written to tmp_path."""

from __future__ import annotations

import csv
import json
import statistics
import warnings
from pathlib import Path

import pytest

from avl_peft.errors import DataError
from avl_peft.study.report import CSV_COLUMNS, build_report, format_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Per-seed forgetting/acc values chosen so that the means and sample stds are easy to check.
LORA = {0: {"acc": 0.70, "forgetting": 0.10}, 1: {"acc": 0.74, "forgetting": 0.14}}
FULL = {0: {"acc": 0.60, "forgetting": 0.30}, 1: {"acc": 0.62, "forgetting": 0.20}}


def _results(
    run_id: str,
    method: str,
    seed: int,
    values: dict[str, float] | None,
    *,
    options: dict | None = None,
    subspace: list | None = None,
    trainable: int = 1000,
    train_s: float = 10.0,
    status: str = "finished",
    error: str | None = None,
) -> dict:
    data = {
        "schema": 1,
        "status": status,
        "run": {
            "id": run_id,
            "method": method,
            "strategy": "naive",
            "seed": seed,
            "policy": "continue",
            "options": options or {},
        },
        "config": {},
        "versions": {},
        "params": {"trainable": trainable, "total": 5_600_000, "adapter": trainable},
        "accuracy_matrix": {
            "class_incremental": [[0.9, 0.0], [0.6, 0.8]],
            "task_aware": [[0.95, 0.0], [0.9, 0.9]],
        },
        "timing": {"train_s": train_s, "eval_s": 1.0, "images_per_s": 100.0},
    }
    if values is not None:
        acc, forgetting = values["acc"], values["forgetting"]
        data["metrics"] = {
            "acc": acc,
            "avg_incremental_acc": acc + 0.1,
            "bwt": -forgetting,
            "forgetting": forgetting,
            "max_forgetting": forgetting + 0.05,
            "til_acc": acc + 0.2,
        }
    if subspace is not None:
        data["subspace"] = subspace
    if error is not None:
        data["error"] = error
    return data


def _write(root: Path, data: dict) -> Path:
    folder = root / data["run"]["id"]
    folder.mkdir(parents=True)
    path = folder / "results.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _subspace(seed: int) -> list[dict]:
    return [
        {"experience": 0, "overlap": 0.2, "alignment": 0.5, "effective_rank": 4.0, "relative_norm": 0.1},
        {
            "experience": 1,
            "overlap": 0.4 + 0.1 * seed,
            "input_overlap": 0.05 * seed,
            "alignment": 0.7,
            "effective_rank": 5.0,
            "relative_norm": 0.2,
            "feature_drift": 0.3 + 0.1 * seed,
        },
    ]


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    """2 methods x 2 seeds (LoRA with subspace data, full fine-tuning without) plus one failed LoRA run."""
    root = tmp_path / "runs"
    for seed, values in LORA.items():
        _write(
            root,
            _results(
                f"lora-r8-naive-s{seed}",
                "lora",
                seed,
                values,
                options={"rank": 8},
                subspace=_subspace(seed),
                trainable=12_000,
                train_s=10.0 + seed,
            ),
        )
    for seed, values in FULL.items():
        _write(
            root / "nested" / "deeper",
            _results(f"full-naive-s{seed}", "full", seed, values, subspace=[], trainable=5_600_000, train_s=50.0),
        )
    _write(
        root,
        _results(
            "lora-r8-naive-s2",
            "lora",
            2,
            None,
            options={"rank": 8},
            status="failed",
            error="CUDA out of memory | try a smaller batch",
        ),
    )
    return root


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _status_ok(line: str) -> bool:
    return line.endswith("| ok |")


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), path


def test_rows_average_over_seeds_and_keep_failed_runs_apart(run_root: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean folder must not produce warnings
        rows = build_report(run_root)

    assert [(r["method"], r["options"], r["status"]) for r in rows] == [
        ("full", "", "finished"),
        ("lora", "rank=8", "finished"),
        ("lora", "rank=8", "failed"),
    ]
    full, lora, failed = rows
    assert lora["seeds"] == 2 and lora["seed_list"] == "0;1"
    assert lora["acc_mean"] == pytest.approx(0.72)
    assert lora["acc_std"] == pytest.approx(statistics.stdev([0.70, 0.74]))
    assert lora["forgetting_mean"] == pytest.approx(0.12)
    assert lora["bwt_mean"] == pytest.approx(-0.12)
    assert lora["max_forgetting_mean"] == pytest.approx(0.17)
    assert lora["til_acc_mean"] == pytest.approx(0.92)
    assert lora["trainable_params"] == 12_000
    assert lora["train_s_mean"] == pytest.approx(10.5)
    assert lora["overlap_mean"] == pytest.approx(statistics.fmean([(0.2 + 0.4) / 2, (0.2 + 0.5) / 2]))
    assert lora["input_overlap_mean"] == pytest.approx(0.025)  # only experience 1 has one: (0 + 0.05) / 2
    assert lora["alignment_mean"] == pytest.approx(0.6)
    assert lora["final_feature_drift"] == pytest.approx(0.35)

    assert full["acc_mean"] == pytest.approx(0.61)
    assert full["forgetting_std"] == pytest.approx(statistics.stdev([0.30, 0.20]))
    assert full["overlap_mean"] is None and full["final_feature_drift"] is None

    assert failed["seeds"] == 1 and failed["run_ids"] == "lora-r8-naive-s2"
    assert failed["acc_mean"] is None and "out of memory" in failed["error"]


def test_csv_holds_raw_numbers(run_root: Path):
    build_report(run_root)
    table = _read_csv(run_root / "report.csv")
    assert tuple(table[0]) == CSV_COLUMNS
    assert len(table) == 3
    lora = table[1]
    assert (lora["method"], lora["options"], lora["strategy"], lora["status"]) == (
        "lora",
        "rank=8",
        "naive",
        "finished",
    )
    assert float(lora["acc_mean"]) == pytest.approx(0.72)
    assert float(lora["acc_std"]) == pytest.approx(statistics.stdev([0.70, 0.74]))
    assert float(lora["forgetting_std"]) == pytest.approx(statistics.stdev([0.10, 0.14]))
    assert int(lora["trainable_params"]) == 12_000
    failed = table[2]
    assert failed["status"] == "failed" and failed["acc_mean"] == ""
    assert failed["error"] == "CUDA out of memory | try a smaller batch"


def test_markdown_report_shows_rows_as_percentages(run_root: Path):
    rows = build_report(run_root)
    markdown = (run_root / "report.md").read_text(encoding="utf-8")
    assert format_table(rows) in markdown
    lora = next(line for line in markdown.splitlines() if line.startswith("| lora | rank=8 | naive | linear | 2 |"))
    assert _status_ok(lora)
    assert f"72.0 ± {statistics.stdev([0.70, 0.74]) * 100:.1f}" in lora  # ACC
    assert "-12.0 ± 2.8" in lora  # BWT
    assert "12,000" in lora
    full = next(line for line in markdown.splitlines() if line.startswith("| full "))
    assert "61.0 ± 1.4" in full and "n/a" in full  # no subspace data for full fine-tuning
    assert "Overlap" in markdown and "Input overlap" in markdown and "Final drift" in markdown
    failed = next(line for line in markdown.splitlines() if "**failed**" in line)
    assert failed.startswith("| lora | rank=8 |")
    assert "CUDA out of memory \\| try a smaller batch" in failed  # the pipe must not split the cell
    assert "## Failed runs" in markdown and "lora-r8-naive-s2" in markdown


def test_single_seed_has_zero_std(tmp_path: Path):
    _write(tmp_path, _results("lora-s0", "lora", 0, LORA[0], options={"rank": 4, "alpha": 8}))
    (row,) = build_report(tmp_path)
    assert row["options"] == "alpha=8,rank=4"
    assert row["acc_std"] == 0.0 and row["forgetting_std"] == 0.0
    assert "70.0 ± 0.0" in format_table([row])
    assert "Overlap" not in format_table([row])  # no subspace columns when no run has subspace data


def test_plots_are_written(run_root: Path):
    build_report(run_root)
    plots = run_root / "plots"
    for run_id in ("lora-r8-naive-s0", "lora-r8-naive-s1", "full-naive-s0", "full-naive-s1"):
        _assert_png(plots / f"acc_matrix_{run_id}.png")
    assert not (plots / "acc_matrix_lora-r8-naive-s2.png").exists()  # failed run: no heatmap
    for name in ("forgetting_vs_params", "forgetting_vs_overlap", "forgetting_vs_alignment"):
        _assert_png(plots / f"{name}.png")
    markdown = (run_root / "report.md").read_text(encoding="utf-8")
    assert "(plots/forgetting_vs_params.png)" in markdown


def test_no_subspace_plots_without_subspace_data(tmp_path: Path):
    _write(tmp_path, _results("full-s0", "full", 0, FULL[0]))
    out = tmp_path / "elsewhere"
    build_report(tmp_path, out_dir=out)
    assert (out / "report.md").is_file() and (out / "report.csv").is_file()
    assert not (tmp_path / "report.md").exists()
    _assert_png(out / "plots" / "forgetting_vs_params.png")
    _assert_png(out / "plots" / "acc_matrix_full-s0.png")
    assert not (out / "plots" / "forgetting_vs_overlap.png").exists()
    assert not (out / "plots" / "forgetting_vs_alignment.png").exists()


def test_metrics_are_recomputed_when_missing(tmp_path: Path):
    data = _results("lora-s0", "lora", 0, None)
    _write(tmp_path, data)
    (row,) = build_report(tmp_path)
    assert row["acc_mean"] == pytest.approx(0.7)  # mean of the last row [0.6, 0.8]
    assert row["forgetting_mean"] == pytest.approx(0.3)
    assert row["til_acc_mean"] == pytest.approx(0.9)


def test_empty_folder_raises_data_error(tmp_path: Path):
    (tmp_path / "some-run").mkdir()
    with pytest.raises(DataError, match="no results.json found") as info:
        build_report(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_folder_raises_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        build_report(tmp_path / "missing")


def test_corrupt_file_is_skipped_with_warning(run_root: Path):
    broken = run_root / "broken-run"
    broken.mkdir()
    (broken / "results.json").write_text('{"schema": 1, "status": "fini', encoding="utf-8")
    wrong_schema = run_root / "future-run"
    wrong_schema.mkdir()
    (wrong_schema / "results.json").write_text(json.dumps({"schema": 99}), encoding="utf-8")

    with pytest.warns(UserWarning) as record:
        rows = build_report(run_root)
    messages = [str(w.message) for w in record]
    assert any(str(broken / "results.json") in m for m in messages)
    assert any(str(wrong_schema / "results.json") in m and "schema" in m for m in messages)
    assert len(rows) == 3  # the readable runs are all still reported


def test_only_corrupt_files_raise_data_error(tmp_path: Path):
    (tmp_path / "results.json").write_text("not json", encoding="utf-8")
    with pytest.warns(UserWarning, match="results.json"), pytest.raises(DataError, match="could be read"):
        build_report(tmp_path)


def test_format_table_has_one_line_per_row(run_root: Path):
    rows = build_report(run_root)
    table = format_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[0].startswith("| Method | Options | Strategy | Head | Seeds | ACC (%)")
    assert all(line.count(" | ") == table[0].count(" | ") for line in table[2:])


def test_schema_2_heads_and_upstream_columns_and_plot(tmp_path: Path):
    """A prototype-head run sits beside the linear-head run of the same method, with the linear head's ACC;
    upstream accuracy and retention are averaged over seeds and plotted against experience."""
    for seed, (acc, up) in enumerate([(0.80, [0.9, 0.8, 0.7]), (0.84, [0.9, 0.7, 0.6])]):
        data = _results(f"lora-proto-s{seed}", "lora", seed, {"acc": acc, "forgetting": 0.1}, options={"rank": 8})
        data["schema"] = 2
        data["heads"] = {"class_incremental": "prototype", "linear": {"metrics": {"acc": acc - 0.5}}}
        data["upstream"] = {"dataset": "glyphs", "head": "checkpoint", "acc": up, "retention": up[-1] / up[0]}
        _write(tmp_path, data)
    linear = _results("lora-linear-s0", "lora", 0, {"acc": 0.3, "forgetting": 0.4}, options={"rank": 8})
    linear["schema"] = 2
    linear["heads"] = {"class_incremental": "linear"}
    _write(tmp_path, linear)

    rows = build_report(tmp_path)
    by_head = {row["head"]: row for row in rows}
    assert set(by_head) == {"linear", "prototype"}
    proto = by_head["prototype"]
    assert proto["seeds"] == 2 and proto["acc_mean"] == pytest.approx(0.82)
    assert proto["linear_acc_mean"] == pytest.approx(0.32)
    assert proto["upstream_acc_mean"] == pytest.approx(0.65)  # the final upstream accuracy, mean over seeds
    assert proto["upstream_retention_mean"] == pytest.approx((0.7 / 0.9 + 0.6 / 0.9) / 2)
    assert by_head["linear"]["upstream_acc_mean"] is None
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Linear-head ACC (%)" in markdown and "Upstream retention" in markdown
    line = next(x for x in markdown.splitlines() if x.startswith("| lora | rank=8 | naive | prototype | 2 |"))
    assert "32.0 ± 2.8" in line and "65.0 ± 7.1" in line and "0.722 ± 0.079" in line  # mean ± std over seeds
    assert proto["upstream_retention_std"] == pytest.approx(0.1 / 0.9 / 2**0.5)
    assert (tmp_path / "plots" / "upstream_acc.png").stat().st_size > 0
    assert (tmp_path / "plots" / "upstream_retention_vs_params.png").stat().st_size > 0
    assert "(plots/upstream_retention_vs_params.png)" in markdown


@pytest.mark.slow  # ~2 s: two 100 x 100 heatmaps rendered
def test_a_100_experience_run_renders_within_the_size_caps_with_its_curves(tmp_path: Path):
    import numpy as np
    from PIL import Image

    from avl_peft.study.report.plots import stream_curves

    T = 100
    rng = np.random.default_rng(0)
    matrix = np.tril(rng.uniform(0.2, 0.9, (T, T)))
    data = _results("long-s0", "sdlora", 0, LORA[0])
    data["accuracy_matrix"] = {"class_incremental": matrix.tolist(), "task_aware": matrix.tolist()}
    _write(tmp_path, data)
    build_report(tmp_path)
    with Image.open(tmp_path / "plots" / "acc_matrix_long-s0.png") as image:
        width, height = image.size
    assert height <= 1300 and width <= 2 * 1200 + 100  # per panel: 12 inches at 100 dpi, heatmap + curves
    curves = stream_curves(np.where(np.tril(np.ones((T, T), bool)), matrix, np.nan))
    t = 37
    assert curves["average accuracy after step t"][t] == pytest.approx(matrix[t, : t + 1].mean())
    assert curves["final accuracy per task"][t] == pytest.approx(matrix[-1, t])
    assert curves["forgetting per task"][t] == pytest.approx(matrix[t, t] - matrix[-1, t])
