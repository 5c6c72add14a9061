"""The CLI end to end, as a user runs it: a tiny study in a subprocess, then the report."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import make_tiny_study

from avl_peft.cli import main

TINY_STUDY = make_tiny_study(
    name="tiny",
    scenario={"n_experiences": 3},
    training={"lr": 0.003},
    subspace=None,
    grid={"method.name": ["lora", "wegeft"]},
)


def avl(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "avl_peft", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_run_then_report(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_STUDY))
    out = tmp_path / "runs"
    proc = avl("run", str(config), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 run(s) finished" in proc.stdout
    for rid in ("lora-rank2-naive-s0", "wegeft-rank2-naive-s0"):
        run = out / rid
        results = json.loads((run / "results.json").read_text())
        for key in ("schema", "run", "config", "versions", "params", "accuracy_matrix", "metrics", "timing"):
            assert key in results
        assert results["schema"] == 2 and results["status"] == "finished"
        assert set(results["versions"]) >= {"avl_peft", "torch", "avalanche", "timm"}
        assert set(results["metrics"]) >= {"acc", "avg_incremental_acc", "bwt", "forgetting", "max_forgetting"}
        assert len(results["accuracy_matrix"]["class_incremental"]) == 3
        assert results["params"]["trainable"] < results["params"]["total"]
        assert yaml.safe_load((run / "config.yaml").read_text())["method"]["name"] == results["run"]["method"]
        assert list((run / "tb").rglob("events.out.tfevents.*"))
        assert sorted(p.name for p in (run / "checkpoints").glob("exp_*.pt")) == ["exp_0.pt", "exp_1.pt", "exp_2.pt"]

    # A second run into the same folder must not silently overwrite finished runs.
    again = avl("run", str(config), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = avl("run", str(config), "--out", str(out), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0 and "0 run(s) finished, 2 skipped" in resumed.stdout

    report = avl("report", str(out), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "lora" in report.stdout and "wegeft" in report.stdout
    assert (out / "report.md").is_file() and (out / "report.csv").is_file()
    assert (out / "plots" / "forgetting_vs_params.png").stat().st_size > 0


@pytest.mark.slow
def test_list_shows_registries(tmp_path):
    proc = avl("list", cwd=tmp_path)
    assert proc.returncode == 0
    for name in ("lora", "pissa", "wegeft", "loretta", "full", "head", "digits", "split_cifar100", "replay"):
        assert name in proc.stdout


def test_list_says_how_each_strategy_resumes(capsys):
    from avl_peft.cl.strategies import STRATEGIES

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    block = out.split("strategies:", 1)[1]
    for name in STRATEGIES.names():
        line = block.split(f"  {name} ", 1)[1].splitlines()[0]  # the entry's line, capabilities in brackets
        assert ("exact resume" if STRATEGIES.get(name).resumable else "restarts on resume") in line, name


@pytest.mark.parametrize("content", ["", "# nothing here\n", "{}\n"])
def test_empty_config_exits_2(tmp_path, capsys, content):
    config = tmp_path / "empty.yaml"
    config.write_text(content)
    assert main(["run", str(config), "--out", str(tmp_path / "runs")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_bad_config_exits_2_without_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY_STUDY, "training": {"epochs": -1}}))
    proc = avl("run", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert "training.epochs" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
    (tmp_path / "empty.yaml").write_text("")
    proc = avl("run", str(tmp_path / "empty.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "is empty" in proc.stderr and "Traceback" not in proc.stderr


def test_diverging_run_is_recorded_failed_and_others_continue(tmp_path):
    from avl_peft.study.config import validate_study
    from avl_peft.study.report import build_report
    from avl_peft.study.run_study import run_study

    study = validate_study(
        {
            **TINY_STUDY,
            "training": {"epochs": 1, "batch_size": 16, "lr": 0.003},
            "variants": [{"method.name": "lora"}, {"method.name": "head", "training.lr": 1e30}],
            "grid": {},
        }
    )
    summary = run_study(study, tmp_path / "out", progress=False)
    status = {s["id"]: s["status"] for s in summary}
    assert status == {"lora-rank2-naive-lr0.003-s0": "finished", "head-naive-lr1e+30-s0": "failed"}
    failed = json.loads((tmp_path / "out" / "head-naive-lr1e+30-s0" / "results.json").read_text())
    assert failed["status"] == "failed" and "diverged" in failed["error"]
    rows = build_report(tmp_path / "out")
    assert any(r.get("status") == "failed" for r in rows)
