"""One run of a study under its lock: finished, skipped (held elsewhere or finished meanwhile) or failed.

Every executor calls :func:`run_one`; a run that crashes is recorded as ``failed`` (with its traceback in
``error.txt``) so the report shows it and the study goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import traceback
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import atomic
from ..errors import AvlPeftError
from . import results
from .experiment import run_experiment


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


def record_failure(run_dir: Path, rid: str, cfg: dict, message: str, details: str) -> dict[str, Any]:
    """Write a failed run's results.json (and error.txt) so the report shows it; return its summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "error.txt", details)
    results.write(run_dir, results.failed(rid, cfg, message))
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
            if results.read_status(run_dir) == "finished" and resume and not force:  # finished meanwhile
                return {"id": rid, "status": "skipped"}
            (run_dir / "error.txt").unlink(missing_ok=True)
            outcome = run_experiment(cfg, run_dir, run_id=rid, progress=progress, resume=resume and not force)
        return {"id": rid, "status": "finished", "acc": outcome["metrics"]["acc"]}
    except AvlPeftError as e:
        if raise_user_errors:
            raise  # the user's to fix (config, data): every other run would fail the same way
        return record_failure(run_dir, rid, cfg, f"{type(e).__name__}: {e}", traceback.format_exc())
    except KeyboardInterrupt:
        raise
    except Exception as e:  # this run failed; record it and let the others run
        return record_failure(run_dir, rid, cfg, f"{type(e).__name__}: {e}", traceback.format_exc())
