"""Running a study: every run of the grid, each in its own folder, nothing finished ever lost.

A run whose ``results.json`` says ``finished`` is complete. ``resume`` skips those; without ``resume``
or ``force`` an existing finished run is never overwritten. A run that crashes (NaN loss, a bug, out of
memory) is recorded as ``failed`` with its error and the study goes on; bad configuration or missing
data stop the study, since every run would fail the same way.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from ..cl import distributed
from ..errors import ConfigError, DataError
from ..options import parse_options
from ..safeio import check_writable, write_text_nofollow
from . import results
from .attempt import lock_holder, run_one
from .config import expand
from .executors import EXECUTORS, ExecutorOptions


def plan(
    study: dict,
    out_dir: Path,
    *,
    resume: bool = False,
    force: bool = False,
    since_ns: int | None = None,
    planned: dict[str, dict] | None = None,
) -> list[tuple[str, dict, str]]:
    """(run id, config, action) for every run; action is 'run' or 'skip'. Refuses silent overwrites.

    ``since_ns`` (a :func:`time.time_ns` value: when this process started) turns on the concurrency rules: a
    ``results.json`` written at or after it comes from another avl-peft process working on the same folder,
    so its run is skipped (never refused as a clash, never redone, even with ``--force``). ``planned``, if
    given, receives per run ``{"results": signature, "since_ns": since_ns}`` and, for such runs, a
    ``"reason"``; :func:`.attempt.run_one` compares the signature again under the run's lock.

    Also refuses (ConfigError) run folders that are, or hold, symbolic links: avl-peft writes only regular
    files there, so a link can only be planted, and following it would write outside ``out_dir``. A
    ``results.json`` that cannot be read (corrupt, truncated, hostile) is reported and its run counts as
    not done.
    """
    runs = []
    clashes = []
    for rid, cfg in expand(study):
        run_dir = out_dir / rid
        refuse_links(run_dir)
        mine = {"results": results.signature(run_dir), "since_ns": since_ns}  # before the status is read
        if planned is not None:
            planned[rid] = mine
        status = _status(run_dir)
        written = results.modified_ns(run_dir)
        if status is not None and since_ns is not None and written is not None and written >= since_ns:
            mine["reason"] = f"{status} by another avl-peft process after this one started; not run twice"
            runs.append((rid, cfg, "skip"))
            continue
        if status == "finished" and resume and not force:
            runs.append((rid, cfg, "skip"))
            continue
        if status is not None and not resume and not force:
            clashes.append(rid)
        runs.append((rid, cfg, "run"))
    if clashes:
        busy = [(rid, holder) for rid, _, _ in runs if (holder := lock_holder(out_dir / rid)) is not None]
        running = (
            f" Another avl-peft process is running this study there right now ({busy[0][1]} runs {busy[0][0]}); "
            "wait for it, or add --resume to skip what it finishes and share the rest."
            if busy
            else ""
        )
        raise ConfigError(
            f"{len(clashes)} run(s) already have results in '{out_dir}' (e.g. {clashes[0]}).{running} Use --resume "
            "to skip finished runs and redo the rest, --force to redo everything, or another --out folder."
        )
    return runs


def _status(run_dir: Path) -> str | None:
    path = run_dir / results.FILENAME
    if not path.exists():
        return None
    try:
        return results.read(path)["status"]
    except DataError as e:
        warnings.warn(f"{e}; this run counts as not done and will be run again", stacklevel=3)
        return None


def refuse_links(run_dir: Path) -> None:
    """ConfigError if ``run_dir`` or anything inside it is a symbolic link or another non-regular file.

    avl-peft writes only folders and regular files there, so anything else was planted: a link would send
    writes (or reads) outside the output folder, a named pipe would block a read forever.
    """
    if run_dir.is_symlink():
        raise ConfigError(
            f"run folder '{run_dir}' is a symbolic link; avl-peft never writes through links (it could point "
            "outside the output folder). Remove it or choose another --out"
        )
    for folder, dirs, files in os.walk(run_dir):  # does not descend into linked folders
        for name in (*dirs, *files):
            path = os.path.join(folder, name)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:  # removed meanwhile (another process's temporary file)
                continue
            if stat.S_ISLNK(mode):
                raise ConfigError(
                    f"'{path}' is a symbolic link inside a run folder; avl-peft writes only regular files there "
                    "and never follows links. Remove it or choose another --out"
                )
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ConfigError(
                    f"'{path}' inside a run folder is not a regular file (a pipe, socket or device); avl-peft "
                    "never writes those. Remove it or choose another --out"
                )


def run_study(
    study: dict,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    executor: str | None = None,
    since_ns: int | None = None,
    **executor_options: Any,
) -> list[dict[str, Any]]:
    """Run every run of a validated study into ``out_dir``; return one summary dict per run.

    ``executor``: ``sequential`` (default), ``local`` (a process pool, ``workers``) or ``ray`` (a Ray task
    per run, ``ray_address``); defaults come from the study's ``executor`` section. ``since_ns``: when this
    study was asked for (default: now; the CLI passes its process start time): results another process
    writes after it are not redone (see :func:`plan`). Skipped runs say why in their ``reason``.
    """
    out_dir = Path(out_dir)
    if distributed.world_size() > 1:
        return _run_study_distributed(study, out_dir, resume=resume, force=force, progress=progress)
    since_ns = time.time_ns() if since_ns is None else since_ns
    check_writable(out_dir)
    planned: dict[str, dict] = {}
    runs = plan(study, out_dir, resume=resume, force=force, since_ns=since_ns, planned=planned)
    write_text_nofollow(out_dir / "study.yaml", yaml.safe_dump(study, sort_keys=False), root=out_dir)
    # The study's section with the caller's overrides (the CLI's --executor/--workers/--ray-address), checked
    # by the executors' own options class.
    given = {**(study.get("executor") or {}), **{k: v for k, v in executor_options.items() if v is not None}}
    options = parse_options(
        ExecutorOptions, "executor", {**given, "name": executor or given.get("name") or "sequential"}, noun="key"
    )
    todo = [(rid, cfg) for rid, cfg, action in runs if action == "run"]
    summary = {
        rid: {"id": rid, "status": "skipped", "reason": planned[rid].get("reason", "already finished (--resume)")}
        for rid, _, action in runs
        if action == "skip"
    }
    outcomes = EXECUTORS.get(options.name)(
        todo, out_dir, resume=resume, force=force, progress=progress, planned=planned, options=options
    )
    summary.update({s["id"]: s for s in outcomes})
    return [summary[rid] for rid, _, _ in runs]


def _run_study_distributed(study: dict, out_dir: Path, *, resume: bool, force: bool, progress: bool) -> list[dict]:
    """Under torchrun: rank 0 plans and writes; every rank runs the same runs in the same order.

    Runs interrupted mid-way restart from their first experience (only rank 0 holds the saved state);
    finished runs are skipped with ``--resume`` as usual.
    """
    main = distributed.rank() == 0
    runs = None
    if main:
        check_writable(out_dir)
        runs = plan(study, out_dir, resume=resume, force=force)
        write_text_nofollow(out_dir / "study.yaml", yaml.safe_dump(study, sort_keys=False), root=out_dir)
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
