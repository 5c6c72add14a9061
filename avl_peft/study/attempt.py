"""One run of a study under its lock: finished, skipped (held elsewhere or finished meanwhile) or failed.

Every executor calls :func:`run_one`; a run that crashes is recorded as ``failed`` (with its traceback in
``error.txt``) so the report shows it and the study goes on.

Two avl-peft processes on one output folder (two terminals, a retried job) never train a run twice: each run
folder is locked while it runs (``safeio.locks``), and a process that finds a run locked skips it and says
which process holds it. A run another process finished (or redid with ``--force``) after this process planned
it is skipped too: the runner records what each ``results.json`` looked like when it planned
(:func:`.results.signature`) and when the process started, and :func:`run_one` compares under the lock.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import AvlPeftError, ConfigError
from ..safeio import write_text_nofollow
from ..safeio.locks import folder_lock, lock_holder
from . import results
from .search import run_with_search


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on a run folder: yields False if another process holds it.

    :func:`avl_peft.safeio.locks.folder_lock` (released by the kernel when its holder dies, holder named in
    the lock file). Neither the run folder nor its ``.lock`` may be a symbolic link (ConfigError): a planted
    link would otherwise send the run's writes outside the output folder.
    """
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise ConfigError(f"run folder '{run_dir}' is a symbolic link or not a folder; remove it")
    with folder_lock(run_dir, blocking=False, what="run folder") as mine:
        yield mine


def _written_by_another(run_dir: Path, planned: dict) -> bool:
    if results.signature(run_dir) != planned["results"]:
        return True
    written, since = results.modified_ns(run_dir), planned.get("since_ns")
    return since is not None and written is not None and written >= since


def record_failure(run_dir: Path, rid: str, cfg: dict, message: str, details: str) -> dict[str, Any]:
    """Write a failed run's results.json (and error.txt) so the report shows it; return its summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_nofollow(run_dir / "error.txt", details, root=run_dir.parent)
    results.write(run_dir, results.failed(rid, cfg, message))
    tqdm.write(f"run {rid} failed: {message} (details in {run_dir / 'error.txt'})")
    return {"id": rid, "status": "failed", "error": message}


def run_one(
    rid: str,
    cfg: dict,
    out_dir: str | Path,
    *,
    resume: bool,
    force: bool,
    progress: bool,
    raise_user_errors: bool,
    planned: dict | None = None,
) -> dict[str, Any]:
    """One run under its lock: finished, skipped (held elsewhere / finished meanwhile) or failed.

    ``planned``: what the runner saw when it planned (``{"results": signature, "since_ns": ns}``, see
    :func:`.run_study.plan`); if ``results.json`` was rewritten since, or after ``since_ns``, another process ran
    this run meanwhile and this one skips it instead of training it twice.
    """
    run_dir = Path(out_dir) / rid
    try:
        with run_lock(run_dir) as mine:
            if not mine:
                holder = lock_holder(run_dir) or "another process"
                reason = f"locked: another avl-peft process ({holder}) is running it; not run twice"
                tqdm.write(f"run {rid}: {reason}; skipped")
                return {"id": rid, "status": "skipped", "reason": reason}
            status = results.read_status(run_dir)
            if planned is not None and status is not None and _written_by_another(run_dir, planned):
                reason = f"{status} by another avl-peft process after this one planned it; not run twice"
                tqdm.write(f"run {rid}: {reason}; skipped")
                return {"id": rid, "status": "skipped", "reason": reason}
            if status == "finished" and resume and not force:  # finished meanwhile
                return {"id": rid, "status": "skipped", "reason": "finished meanwhile"}
            (run_dir / "error.txt").unlink(missing_ok=True)
            outcome = run_with_search(cfg, run_dir, run_id=rid, progress=progress, resume=resume and not force)
        return {"id": rid, "status": "finished", "acc": outcome["metrics"]["acc"]}
    except AvlPeftError as e:
        if raise_user_errors:
            raise  # the user's to fix (config, data): every other run would fail the same way
        return record_failure(run_dir, rid, cfg, f"{type(e).__name__}: {e}", traceback.format_exc())
    except KeyboardInterrupt:
        raise
    except Exception as e:  # this run failed; record it and let the others run
        return record_failure(run_dir, rid, cfg, f"{type(e).__name__}: {e}", traceback.format_exc())
