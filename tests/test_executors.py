"""Executors: a local process pool and Ray give the sequential runner's results, and isolate failures."""

import json

import pytest
from conftest import make_tiny_study

from avl_peft.errors import ConfigError
from avl_peft.study.config import validate_study
from avl_peft.study.run_study import run_study

GRID = make_tiny_study(
    training={"lr": 0.003},
    subspace={"enabled": True, "probe_size": 4},
    grid={"method.name": ["lora", "wegeft"], "seed": [0, 1]},
)


def metrics(out):
    return {
        p.parent.name: json.loads(p.read_text())["accuracy_matrix"]
        for p in out.glob("*/results.json")
        if json.loads(p.read_text())["status"] == "finished"
    }


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    run_study(validate_study(GRID), out, progress=False)
    return metrics(out)


@pytest.mark.slow
def test_local_pool_matches_sequential(sequential, tmp_path):
    summary = run_study(validate_study(GRID), tmp_path, progress=False, executor="local", workers=2)
    assert sorted(s["status"] for s in summary) == ["finished"] * 4
    assert metrics(tmp_path) == sequential


@pytest.mark.slow
def test_ray_matches_sequential_and_isolates_failures(sequential, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_study(validate_study(GRID), tmp_path, progress=False, executor="ray")
        assert sorted(s["status"] for s in summary) == ["finished"] * 4
        assert metrics(tmp_path) == sequential
        # One diverging run among good ones: reported failed, the others finish.
        bad = {**GRID, "variants": [{}, {"method.name": "head", "training.lr": 1e30, "seed": 0}]}
        out = tmp_path / "with-failure"
        summary = run_study(validate_study(bad), out, progress=False, executor="ray")
        status = {s["id"]: s["status"] for s in summary}
        assert status.pop("head-naive-lr1e+30-s0") == "failed"
        assert set(status.values()) == {"finished"}
        failed = json.loads((out / "head-naive-lr1e+30-s0" / "results.json").read_text())
        assert failed["status"] == "failed" and "diverged" in failed["error"]
        # --resume skips what Ray finished.
        again = run_study(validate_study(bad), out, progress=False, executor="ray", resume=True)
        again = {s["id"]: s["status"] for s in again}
        assert again.pop("head-naive-lr1e+30-s0") == "failed"  # a failed run is retried on resume (and fails again)
        assert set(again.values()) == {"skipped"}
    finally:
        ray.shutdown()


def test_executor_settings_are_validated():
    with pytest.raises(ConfigError, match="executor.name"):
        validate_study({**GRID, "executor": {"name": "slurm"}})
    with pytest.raises(ConfigError, match="study setting"):
        validate_study({**GRID, "grid": {"executor.workers": [1, 2]}})


def test_ray_executor_without_ray_says_how_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"pip install 'avl-peft\[ray\]'"):
        run_study(validate_study(GRID), tmp_path, progress=False, executor="ray")
