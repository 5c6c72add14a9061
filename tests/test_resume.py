"""Reliability: resume after SIGKILL, corrupted state, determinism, locks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_study

from avl_peft.study import experiment as study_mod
from avl_peft.study.attempt import run_lock
from avl_peft.study.config import expand, validate_study
from avl_peft.study.run_study import run_study

STUDY = make_tiny_study(
    name="resume",
    scenario={"n_experiences": 3, "options": {"n_classes": 6, "n_train_per_class": 40}},
    training={"epochs": 3, "batch_size": 8, "lr": 0.003},
    subspace={"enabled": True, "probe_size": 8},
)


def matrices(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["accuracy_matrix"]


def assert_same(a: dict, b: dict, tol: float = 1e-6) -> None:
    for kind in ("class_incremental", "task_aware"):
        for ra, rb in zip(a[kind], b[kind]):
            assert all(abs(x - y) <= tol for x, y in zip(ra, rb)), (kind, a[kind], b[kind])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_study(validate_study(STUDY), out, progress=False)
    return out / "lora-rank2-naive-s0"


def test_same_seed_same_results(reference, tmp_path):
    run_study(validate_study(STUDY), tmp_path, progress=False)
    again = json.loads((tmp_path / "lora-rank2-naive-s0" / "results.json").read_text())
    ref = json.loads((reference / "results.json").read_text())
    assert again["accuracy_matrix"] == ref["accuracy_matrix"]  # bit-identical on CPU
    assert again["subspace"] == ref["subspace"]


def _crash_after(monkeypatch, experience: int) -> None:
    original = study_mod.run_state.save_run_state

    def save_then_crash(run_dir, t, state):
        original(run_dir, t, state)
        if t == experience:
            raise KeyboardInterrupt  # like a kill right after the state reached the disk

    monkeypatch.setattr(study_mod.run_state, "save_run_state", save_then_crash)


def test_resume_after_crash_equals_uninterrupted(reference, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _crash_after(m, 0)
        with pytest.raises(KeyboardInterrupt):
            run_study(validate_study(STUDY), tmp_path, progress=False)
    run_dir = tmp_path / "lora-rank2-naive-s0"
    assert not (run_dir / "results.json").exists() and (run_dir / "state_0.pt").exists()
    run_study(validate_study(STUDY), tmp_path, resume=True, progress=False)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed_at_experience"] == 1
    assert_same(results["accuracy_matrix"], matrices(reference))
    ref = json.loads((reference / "results.json").read_text())
    for a, b in zip(results["subspace"], ref["subspace"]):
        assert a["alignment"] == pytest.approx(b["alignment"], abs=1e-6)
    assert not list(run_dir.glob("state_*")), "states are removed once the run is finished"


def test_corrupted_state_is_detected_and_that_experience_retrained(reference, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        _crash_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run_study(validate_study(STUDY), tmp_path, progress=False)
    run_dir = tmp_path / "lora-rank2-naive-s0"
    state = run_dir / "state_1.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a full disk
    run_study(validate_study(STUDY), tmp_path, resume=True, progress=False)
    captured = capsys.readouterr()
    assert "state_1.pt: checksum mismatch" in captured.out + captured.err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed_at_experience"] == 1  # state_1 rejected: experience 1 retrained from state_0
    assert_same(results["accuracy_matrix"], matrices(reference))


# The SIGKILL runs: a base session first (pretrain), so one kill lands right after it; 60 images per class
# make each experience take long enough for a kill to land between two state files.
KILL_STUDIES = {
    "lora-pretrain": {
        **STUDY,
        "scenario": {"name": "synthetic", "n_experiences": 3, "options": {"n_classes": 6, "n_train_per_class": 60}},
        "training": {**STUDY["training"], "pretrain": True},
    },
    "pissa-replay-merge": {
        **STUDY,
        "scenario": {"name": "synthetic", "n_experiences": 3, "options": {"n_classes": 6, "n_train_per_class": 60}},
        "training": {**STUDY["training"], "train_mask": "seen"},
        "method": {"name": "pissa", "options": {"rank": 2}, "policy": "merge"},
        "strategy": {"name": "replay", "options": {"mem_size": 24}},
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KILL_STUDIES))
def test_sigkill_at_every_point_then_resume(name, tmp_path):
    """SIGKILL the CLI during the first experience, then right after each state file appears (after the base
    session, after experience 1), resuming each time; the kill must land mid-run every time (return code
    -9, no results.json, the next state not written yet), and the finished run equals the uninterrupted one."""
    data = KILL_STUDIES[name]
    ((rid, _),) = expand(validate_study(data))
    run_study(validate_study(data), tmp_path / "reference", progress=False)
    reference = tmp_path / "reference" / rid
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    run_dir = out / rid
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "avl_peft", "run", str(config), "--out", str(out), "--quiet", "--resume"]
    for wait_for, not_yet in ((None, "state_0.pt"), ("state_0.pt", "state_1.pt"), ("state_1.pt", "results.json")):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # A state counts once its checksum sidecar (written right after it) exists: a kill between the two
        # leaves an unverifiable state that resume rightly skips, which is tested elsewhere.
        ready = (run_dir / "config.yaml") if wait_for is None else (run_dir / wait_for).with_suffix(".sha256")
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not ready.exists():
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the run ended on its own before the kill ({wait_for})"
        assert not (run_dir / "results.json").exists()
        assert not (run_dir / not_yet).exists(), f"killed after {not_yet} was written, not right after {wait_for}"
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed_at_experience"] == 2
    assert_same(results["accuracy_matrix"], matrices(reference))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("exp_*.pt")) == ["exp_0.pt", "exp_1.pt", "exp_2.pt"]


def test_finished_run_is_not_overwritten_and_lock_skips(reference, tmp_path):
    run_study(validate_study(STUDY), tmp_path, progress=False)
    from avl_peft.errors import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        run_study(validate_study(STUDY), tmp_path, progress=False)
    # Another process holds the run: this one skips it instead of corrupting it.
    run_dir = tmp_path / "lora-rank2-naive-s0"
    with run_lock(run_dir) as mine:
        assert mine
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                    "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
                ),
                str(run_dir / ".lock"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
    try:
        assert holder.stdout.readline().strip() == "locked"
        summary = run_study(validate_study(STUDY), tmp_path, force=True, progress=False)
        assert summary[0]["status"] == "skipped" and "locked" in summary[0]["reason"]
    finally:
        holder.kill()
        holder.wait()


def test_expand_is_stable():
    assert [rid for rid, _ in expand(validate_study(STUDY))] == ["lora-rank2-naive-s0"]
