"""Two avl-peft processes on one output folder never train a run twice, and each says which runs it left
to the other (locked by it, or finished by it meanwhile): a lock held by another process, a run finished
between planning and locking, and two real `avl-peft run` processes started a second apart (plain,
--force, --resume)."""

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_study

from avl_peft.cli import main

SMALL = make_tiny_study()


def finished_results(run_id: str) -> dict:
    return {
        "schema": 2,
        "status": "finished",
        "run": {"id": run_id, "method": "lora", "strategy": "naive", "seed": 0, "options": {"rank": 2}},
        "params": {"trainable": 100},
        "accuracy_matrix": {"class_incremental": [[0.9, None], [0.8, 0.7]]},
    }


def write_config(tmp_path: Path, study: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


HOLD_LOCK = (
    "import fcntl, os, socket, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}\\n'.encode())\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_run_locked_by_another_process_is_skipped_and_named(tmp_path, capsys):
    config = write_config(tmp_path, {**SMALL, "grid": {"seed": [0, 1]}})
    out = tmp_path / "out"
    locked = out / "lora-rank2-naive-s1"
    locked.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(locked / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        who = f"pid {holder.pid} on {socket.gethostname()}"
        assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
        printed = capsys.readouterr().out
        assert f"skipped  lora-rank2-naive-s1: locked: another avl-peft process ({who}) is running it" in printed
        assert "finished lora-rank2-naive-s0" in printed and "1 run(s) finished, 1 skipped, 0 failed" in printed
        assert not (locked / "results.json").exists()  # the held run was not touched
        # Run again without --resume while the other process still runs the study: refused, saying so.
        assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"Another avl-peft process is running this study there right now ({who} runs" in err
    finally:
        holder.kill()
        holder.wait()


def test_a_run_finished_by_another_process_after_planning_is_not_run_again(tmp_path):
    from avl_peft.study.attempt import run_one
    from avl_peft.study.config import load_study
    from avl_peft.study.run_study import plan

    study = load_study(write_config(tmp_path, SMALL))
    out = tmp_path / "out"
    planned: dict = {}
    [(rid, cfg, action)] = plan(study, out, force=True, since_ns=time.time_ns(), planned=planned)
    assert action == "run" and planned[rid]["results"] == "absent"
    # Meanwhile another process finishes the run...
    (out / rid).mkdir(parents=True)
    (out / rid / "results.json").write_text(json.dumps(finished_results(rid)))
    # ...so this one, getting the lock afterwards, leaves it alone even with --force.
    summary = run_one(
        rid, cfg, out, resume=False, force=True, progress=False, raise_user_errors=True, planned=planned[rid]
    )
    assert summary["status"] == "skipped"
    assert summary["reason"] == "finished by another avl-peft process after this one planned it; not run twice"
    assert json.loads((out / rid / "results.json").read_text()) == finished_results(rid)
    # A results.json written after this process started is another's too, seen when planning.
    [(_, _, action)] = plan(study, out, force=True, since_ns=0, planned=planned)
    assert action == "skip" and "after this one started" in planned[rid]["reason"]


CONCURRENT = make_tiny_study(
    backbone={"kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}}, grid={"seed": [0, 1, 2]}
)
RUN_IDS = [f"lora-rank2-naive-s{seed}" for seed in (0, 1, 2)]


def _two_processes(config: Path, out: Path, *flags: str) -> list[subprocess.CompletedProcess]:
    """The same `avl-peft run` twice, the second started one second after the first."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "avl_peft", "run", str(config), "--out", str(out), "--quiet", *flags]
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(1)
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return done


def _trainings(out: Path) -> dict[str, int]:
    """How often each run was trained: every training opens a new TensorBoard events file."""
    return {rid: len(list((out / rid / "tb").glob("events.out.tfevents.*"))) for rid in RUN_IDS}


def _check_phase(procs, out: Path, before: dict[str, int], trained: set[str]) -> None:
    """Both processes exit 0; each run in `trained` was trained by exactly one of them and the others by
    none; for every run it did not train, a process says why (locked by, or done by, the other one)."""
    lines = [
        {line.split()[1].rstrip(":"): line for line in p.stdout.splitlines() if line.startswith("  ")} for p in procs
    ]
    for proc in procs:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
    finished = Counter(rid for per_run in lines for rid, line in per_run.items() if line.startswith("  finished "))
    assert finished == Counter(trained), [p.stdout for p in procs]
    assert _trainings(out) == {rid: before[rid] + (rid in trained) for rid in RUN_IDS}
    for per_run in lines:
        assert sorted(per_run) == RUN_IDS
        for rid, line in per_run.items():
            if rid in trained and not line.startswith("  finished "):
                assert line.startswith("  skipped ") and "not run twice" in line, line
    for rid in RUN_IDS:  # nothing corrupted: every results.json reads and belongs to its run
        data = json.loads((out / rid / "results.json").read_text())
        assert data["status"] == "finished" and data["run"]["id"] == rid


@pytest.mark.slow
def test_two_processes_on_one_folder_never_train_a_run_twice(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(CONCURRENT))
    out = tmp_path / "out"
    zero = dict.fromkeys(RUN_IDS, 0)

    _check_phase(_two_processes(config, out), out, zero, set(RUN_IDS))

    counts = _trainings(out)
    _check_phase(_two_processes(config, out, "--force"), out, counts, set(RUN_IDS))  # redone once, not twice

    counts = _trainings(out)
    for rid in RUN_IDS[1:]:  # two runs lose their results, as after a crash
        (out / rid / "results.json").unlink()
    resumed = _two_processes(config, out, "--resume")
    _check_phase(resumed, out, counts, set(RUN_IDS[1:]))
    for proc in resumed:
        assert f"  skipped  {RUN_IDS[0]}: already finished (--resume)" in proc.stdout
    assert main(["report", str(out)]) == 0


def test_a_pretrain_card_is_read_under_the_lock_that_writes_it(tmp_path):
    """read_card waits while another process holds the folder's build lock (it may be replacing the weights)."""
    import threading

    from test_hostile import weights_and_card

    from avl_peft.pretrain import read_card

    out = tmp_path / "pretrained"
    weights_and_card(out)
    (out / ".lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        got: list = []
        reader = threading.Thread(target=lambda: got.append(read_card(out)))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and not got  # waiting for the build to finish
    finally:
        holder.kill()
        holder.wait()
    reader.join(10)
    assert got and got[0]["name"] == "owner"
