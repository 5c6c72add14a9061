"""The report's statistics sections (study/report/claims.py) on planted results: intervals, pairs, claims."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import avl_peft.study.report as report_module
from avl_peft.study.report import build_report
from avl_peft.study.report.claims import judge_claims
from avl_peft.study.report.runs import load_run

SEEDS = range(8)  # 6 would not do: 4 claims x 2^-6 > 0.05 after Holm


def _write(root: Path, method: str, seed: int, acc: float, retention: float, head: str = "prototype") -> None:
    folder = root / f"{method}-{head}-s{seed}"
    folder.mkdir(parents=True)
    data = {
        "schema": 2,
        "status": "finished",
        "run": {"id": folder.name, "method": method, "strategy": "naive", "seed": seed, "options": {}},
        "config": {},
        "params": {"trainable": 1000},
        "metrics": {"acc": acc, "forgetting": 1 - acc, "til_forgetting": 0.1},
        "timing": {"train_s": 1.0},
        "heads": {"class_incremental": head},
        "upstream": {"acc": [0.7, 0.7 * retention], "retention": retention},
    }
    (folder / "results.json").write_text(json.dumps(data))


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr(report_module, "write_plots", lambda *args, **kwargs: [])  # seconds of matplotlib


@pytest.fixture
def planted(tmp_path):
    # Planted: head keeps the pretrained knowledge (retention ~1.0), full loses a third of it; acc equal in
    # expectation for lora and full (no planted difference), seed effects shared by the methods of a seed.
    rng = np.random.default_rng(0)
    for seed in SEEDS:
        shared = rng.normal(0, 0.05)
        _write(tmp_path, "head", seed, 0.80 + shared, 1.0)
        _write(tmp_path, "full", seed, 0.50 + shared + rng.normal(0, 0.03), 0.65 + rng.normal(0, 0.02))
        _write(tmp_path, "lora", seed, 0.50 + shared + rng.normal(0, 0.03), 0.85 + rng.normal(0, 0.02))
    return tmp_path


def test_claims_on_planted_results_are_judged_in_the_report(planted):
    claims = [
        {"better": "head", "than": "full", "metric": "upstream_retention"},  # planted: holds
        {"better": "full", "than": "lora", "metric": "upstream_retention"},  # planted opposite: does not hold
        {"better": "lora", "than": "full", "metric": "acc"},  # nothing planted: inconclusive
        {"better": "lora", "than": "full", "metric": "forgetting"},  # lower is better; nothing planted
        {"better": "qlora", "than": "full", "metric": "acc"},  # no such runs
    ]
    (planted / "study.yaml").write_text(yaml.safe_dump({"name": "planted", "claims": claims}))
    build_report(planted)
    report = (planted / "report.md").read_text()
    lines = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if " better than " in line}
    assert "**holds**" in lines["head better than full on upstream_retention"]
    assert "**does not hold**" in lines["full better than lora on upstream_retention"]
    assert "**inconclusive**" in lines["lora better than full on acc"]
    assert "**inconclusive**" in lines["lora better than full on forgetting"]
    assert "no finished runs of 'qlora'" in lines["qlora better than full on acc"]
    assert "## Confidence intervals" in report and "## Paired comparisons" in report
    pairs = [line for line in report.splitlines() if line.startswith("| full vs head | upstream_retention")]
    assert len(pairs) == 1 and pairs[0].endswith("| 0.00781 | 0.0234 | yes |")  # 2/2^8, Holm over 3 pairs


def test_claim_verdict_numbers(planted):
    runs = [load_run(p) for p in sorted(planted.rglob("results.json"))]
    [entry] = judge_claims([{"better": "head", "than": "full", "metric": "upstream_retention"}], runs)
    assert entry["verdict"] == "holds" and entry["n"] == 8
    assert entry["p_holm"] == pytest.approx(1 / 256)  # every seed in the claimed direction, one claim
    assert 0.30 < entry["low"] < entry["difference"] < entry["high"] < 0.40
    # a side matching several configurations is named, not guessed
    _write(planted, "head", 0, 0.9, 1.0, head="ranpac")
    runs = [load_run(p) for p in sorted(planted.rglob("results.json"))]
    [entry] = judge_claims([{"better": "head", "than": "full", "metric": "acc"}], runs)
    assert entry["verdict"] == "inconclusive" and "matches 2 configurations" in entry["note"]
    [entry] = judge_claims([{"better": "head", "than": "full", "metric": "acc", "head": "prototype"}], runs)
    assert entry["verdict"] == "holds"


def test_one_seed_gives_no_statistics(tmp_path):
    _write(tmp_path, "head", 0, 0.8, 1.0)
    _write(tmp_path, "full", 0, 0.5, 0.6)
    build_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Confidence intervals" not in report and "## Paired comparisons" not in report


def test_a_selection_shared_by_seeds_is_one_row_with_every_candidate(tmp_path):
    trials = [
        {"id": "t0", "values": {"training.lr": 0.001}, "score": 0.8},
        {"id": "t1", "values": {"training.lr": 0.0003}, "score": 0.9},
    ]
    shared = {
        "per": "variant",
        "seed": 0,
        "chosen": {"training.lr": 0.0003},
        "chosen_score": 0.9,
        "metric": "acc",
        "trials": trials,
        "validation": {"experiences": "all", "fraction": 0.2},
        "tied": 1,
    }
    for seed in range(3):
        _write(tmp_path, "lora", seed, 0.5, 0.9)
        path = tmp_path / f"lora-prototype-s{seed}" / "results.json"
        data = json.loads(path.read_text())
        data["search"] = shared if seed < 2 else {**shared, "per": "run", "seed": 2}
        path.write_text(json.dumps(data))
    build_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if "0.001: 0.800; 0.0003: 0.900" in line]
    assert len(rows) == 2  # seeds 0 and 1 share one selection; seed 2 chose on its own
    assert rows[0].startswith("| lora (2 runs) | training.lr = 0.0003 | acc 0.9000 |")  # 2 candidates: no end
    assert "per variant, seed 0; all, 0.2" in rows[0]
    assert rows[1].startswith("| lora-prototype-s2 |") and "per run; all, 0.2" in rows[1]


def test_pairs_that_cannot_reach_significance_are_said_so_and_ranks_sort_as_numbers(tmp_path):
    # 6 configurations = 15 pairs per metric; at 8 seeds the best Holm-adjusted p is 15 * 2^-7 = 0.117.
    ranks = [1, 2, 4, 8, 16, 64]
    for rank in ranks:
        for seed in SEEDS:
            _write(tmp_path, f"lora-r{rank}", seed, 0.5 + rank / 1000 + seed / 100, 0.9)
            path = tmp_path / f"lora-r{rank}-prototype-s{seed}" / "results.json"
            data = json.loads(path.read_text())
            data["run"].update(method="lora", options={"rank": rank})
            path.write_text(json.dumps(data))
    build_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "with 15 pairs per metric the smallest Holm-adjusted p" in report and "is 0.117" in report
    assert "run ≥ 10 seeds for 15 pairs" in report  # 15 * 2^-9 = 0.029
    intervals = report.split("## Confidence intervals")[1].split("## Paired comparisons")[0]
    order = [line.split(" | ")[0].lstrip("| ") for line in intervals.splitlines() if line.startswith("| lora")]
    assert order == [f"lora (rank={r})" for r in ranks]


def test_a_design_that_can_reach_significance_gets_no_warning(planted):
    build_report(planted)  # 3 pairs at 8 seeds: 3 * 2^-7 = 0.023
    assert "No pair here can reach significance" not in (planted / "report.md").read_text()


def test_a_choice_at_the_end_of_its_grid_is_marked(tmp_path):
    grid = [0.003, 0.001, 0.0003, 0.0001]
    for seed, chosen in enumerate([0.0001, 0.001]):
        _write(tmp_path, f"m{seed}", seed, 0.5, 0.9)
        path = tmp_path / f"m{seed}-prototype-s{seed}" / "results.json"
        data = json.loads(path.read_text())
        trials = [{"id": f"t{i}", "values": {"training.lr": lr}, "score": 0.5} for i, lr in enumerate(grid)]
        data["search"] = {"chosen": {"training.lr": chosen}, "chosen_score": 0.5, "metric": "acc", "trials": trials}
        path.write_text(json.dumps(data))
    build_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| m0-prototype-s0 | training.lr = 0.0001 (grid end) |" in report
    assert "| m1-prototype-s1 | training.lr = 0.001 |" in report
