"""Running a study: every run of the grid in turn, each in its own folder, nothing finished ever lost.

A run whose ``results.json`` says ``finished`` is complete. ``resume`` skips those; without ``resume``
or ``force`` an existing finished run is never overwritten. A run that crashes (NaN loss, a bug, out of
memory) is recorded as ``failed`` with its error and the study goes on; bad configuration or missing
data stop the study, since every run would fail the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import traceback
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from . import atomic
from .config import expand
from .errors import AvlPeftError, ConfigError
from .study import SCHEMA_VERSION, run_experiment, run_info


def read_status(run_dir: Path) -> str | None:
    """'finished', 'failed' or None (never started, interrupted or unreadable)."""
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def plan(study: dict, out_dir: Path, *, resume: bool = False, force: bool = False) -> list[tuple[str, dict, str]]:
    """(run id, config, action) for every run; action is 'run' or 'skip'. Refuses silent overwrites."""
    runs = []
    clashes = []
    for rid, cfg in expand(study):
        status = read_status(out_dir / rid)
        if status == "finished" and resume and not force:
            runs.append((rid, cfg, "skip"))
            continue
        if status is not None and not resume and not force:
            clashes.append(rid)
        runs.append((rid, cfg, "run"))
    if clashes:
        raise ConfigError(
            f"{len(clashes)} run(s) already have results in '{out_dir}' (e.g. {clashes[0]}). Use --resume to "
            "skip finished runs and redo the rest, --force to redo everything, or another --out folder."
        )
    return runs


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """An exclusive, non-blocking lock on a run folder: yields False if another process holds it.

    flock is released by the kernel when its holder dies (even by SIGKILL), so a stale lock never blocks
    a resume.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".avl-peft-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"output folder '{out_dir}' is not writable ({e.strerror}); choose another with --out"
        ) from None


def record_failure(run_dir: Path, rid: str, cfg: dict, message: str, details: str) -> dict[str, Any]:
    """Write a failed run's results.json (and error.txt) so the report shows it; return its summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "error.txt", details)
    atomic.write_json(
        run_dir / "results.json",
        {
            "schema": SCHEMA_VERSION,
            "status": "failed",
            "error": message,
            "run": run_info(rid, cfg),
            "config": cfg,
        },
    )
    tqdm.write(f"run {rid} failed: {message} (details in {run_dir / 'error.txt'})")
    return {"id": rid, "status": "failed", "error": message}


def run_one(
    rid: str, cfg: dict, out_dir: str | Path, *, resume: bool, force: bool, progress: bool, raise_user_errors: bool
) -> dict[str, Any]:
    """One run under its lock: finished, skipped (held elsewhere / finished meanwhile) or failed."""
    run_dir = Path(out_dir) / rid
    try:
        with run_lock(run_dir) as mine:
            if not mine:
                tqdm.write(f"run {rid}: another avl-peft process is running it; skipped")
                return {"id": rid, "status": "skipped", "reason": "locked by another process"}
            if read_status(run_dir) == "finished" and resume and not force:  # finished meanwhile
                return {"id": rid, "status": "skipped"}
            (run_dir / "error.txt").unlink(missing_ok=True)
            results = run_experiment(cfg, run_dir, run_id=rid, progress=progress, resume=resume and not force)
        return {"id": rid, "status": "finished", "acc": results["metrics"]["acc"]}
    except AvlPeftError as e:
        if raise_user_errors:
            raise  # the user's to fix (config, data): every other run would fail the same way
        return record_failure(run_dir, rid, cfg, f"{type(e).__name__}: {e}", traceback.format_exc())
    except KeyboardInterrupt:
        raise
    except Exception as e:  # this run failed; record it and let the others run
        return record_failure(run_dir, rid, cfg, f"{type(e).__name__}: {e}", traceback.format_exc())


def run_study(
    study: dict,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    executor: str | None = None,
    **executor_options: Any,
) -> list[dict[str, Any]]:
    """Run every run of a validated study into ``out_dir``; return one summary dict per run.

    ``executor``: ``sequential`` (default), ``local`` (a process pool, ``workers``) or ``ray`` (a Ray task
    per run, ``ray_address``); defaults come from the study's ``executor`` section.
    """
    from . import distributed
    from .executors import EXECUTORS

    out_dir = Path(out_dir)
    if distributed.world_size() > 1:
        return _run_study_distributed(study, out_dir, resume=resume, force=force, progress=progress)
    check_writable(out_dir)
    runs = plan(study, out_dir, resume=resume, force=force)
    atomic.write_text(out_dir / "study.yaml", yaml.safe_dump(study, sort_keys=False))
    settings = {**(study.get("executor") or {}), **{k: v for k, v in executor_options.items() if v is not None}}
    name = executor or settings.pop("name", None) or "sequential"
    settings.pop("name", None)
    todo = [(rid, cfg) for rid, cfg, action in runs if action == "run"]
    summary = {rid: {"id": rid, "status": "skipped"} for rid, _, action in runs if action == "skip"}
    results = EXECUTORS.get(name)(todo, out_dir, resume=resume, force=force, progress=progress, **settings)
    summary.update({s["id"]: s for s in results})
    return [summary[rid] for rid, _, _ in runs]


def _run_study_distributed(study: dict, out_dir: Path, *, resume: bool, force: bool, progress: bool) -> list[dict]:
    """Under torchrun: rank 0 plans and writes; every rank runs the same runs in the same order.

    Runs interrupted mid-way restart from their first experience (only rank 0 holds the saved state);
    finished runs are skipped with ``--resume`` as usual.
    """
    import tempfile

    from . import distributed

    main = distributed.rank() == 0
    runs = None
    if main:
        check_writable(out_dir)
        runs = plan(study, out_dir, resume=resume, force=force)
        atomic.write_text(out_dir / "study.yaml", yaml.safe_dump(study, sort_keys=False))
    runs = distributed.broadcast_object(runs)
    summary = []
    with tempfile.TemporaryDirectory(prefix="avl-peft-rank") as scratch:
        target = out_dir if main else Path(scratch)
        for rid, cfg, action in runs:
            if action == "skip":
                summary.append({"id": rid, "status": "skipped"})
                continue
            summary.append(
                run_one(rid, cfg, target, resume=False, force=True, progress=progress and main, raise_user_errors=True)
            )
    return summary
