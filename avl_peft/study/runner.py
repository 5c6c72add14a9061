"""Running a study: every run of the grid, each in its own folder, nothing finished ever lost.

A run whose ``results.json`` says ``finished`` is complete. ``resume`` skips those; without ``resume``
or ``force`` an existing finished run is never overwritten. A run that crashes (NaN loss, a bug, out of
memory) is recorded as ``failed`` with its error and the study goes on; bad configuration or missing
data stop the study, since every run would fail the same way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from .. import atomic
from ..cl import distributed
from ..errors import ConfigError
from . import results
from .executors import EXECUTORS
from .grid import expand
from .run import run_one


def plan(study: dict, out_dir: Path, *, resume: bool = False, force: bool = False) -> list[tuple[str, dict, str]]:
    """(run id, config, action) for every run; action is 'run' or 'skip'. Refuses silent overwrites."""
    runs = []
    clashes = []
    for rid, cfg in expand(study):
        status = results.read_status(out_dir / rid)
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
