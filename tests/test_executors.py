"""Executors: a local process pool and Ray give the sequential runner's results, and isolate failures."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
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


def _children(pid: int) -> set[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has stopped; only its exit status is left to collect


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_pool_workers_stop_when_the_study_process_is_killed(tmp_path):
    """`kill -9` of the CLI alone (not its process group) must not leave its workers training unseen."""
    study = make_tiny_study(
        scenario={"name": "synthetic", "n_experiences": 2, "options": {"n_train_per_class": 3000}},
        training={"epochs": 20},
        grid={"seed": [0, 1]},
    )
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    cmd = [sys.executable, "-m", "avl_peft", "run", str(config), "--out", str(tmp_path / "out"), "--quiet"]
    proc = subprocess.Popen(
        [*cmd, "--executor", "local", "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((tmp_path / "out").glob("*/config.yaml"))) < 2:
            assert proc.poll() is None, "the study ended before both workers started a run"
            time.sleep(0.1)
        workers = _children(proc.pid)
        started = [w for w in workers if "spawn_main" in Path(f"/proc/{w}/cmdline").read_text()]
        assert len(started) == 2, f"expected 2 pool workers, found {workers}"
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    deadline = time.time() + 90  # dying takes CPU time: seconds on a loaded machine at nice 19
    while time.time() < deadline and any(_alive(w) for w in started):
        time.sleep(0.1)
    assert not any(_alive(w) for w in started), "a worker kept running after the study's process was killed"
    assert not list((tmp_path / "out").glob("*/results.json"))  # they were stopped mid-run, not finished
