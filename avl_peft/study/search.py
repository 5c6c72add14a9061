"""Validation-based selection: a run's ``search`` grid tuned on a validation split of its training data.

A run (study- or variant-level) may say ``search: {training.lr: [1e-3, 3e-4, 1e-4]}`` (dotted keys, lists of
candidates; several keys are crossed). Before the run trains, every combination is tried as a *trial*: the
run's config with those values, trained on the training data minus a validation split carved from it
(:func:`avl_peft.cl.scenarios.validation.carve_validation`: seeded, stratified, ``validation.fraction`` of
each class) and scored on that split by ``validation.metric``. The best trial's values (first in grid order
on a tie) are then applied and the run trains and tests as usual; its ``results.json`` gets a ``search``
block: the space, the validation settings and sizes, every trial's score and the chosen values. The test
set is never read by a trial.

Trials are resumable: each finished trial writes ``search-trials/<trial>/trial.json`` atomically (with the
hash of its config) and its training folder is removed; with ``--resume`` a trial whose ``trial.json``
matches is not run again, and an interrupted trial continues from its last finished experience.
Trials train without the subspace and upstream measurements (the selection does not read them).

``validation.per: variant`` is the usual protocol of a comparison over seeds: choose once per method, then
run every seed with the choice. Trials then run with ``seed: validation.seed`` (0 when null) in place of the
run's seed — model initialisation, data order and split — so the runs of a variant that differ only in their
seed have identical trials. They live in the study folder (``<out>/search-trials/<hash>-<trial>/``), keyed by
the hash of the trial's config, each under its own lock: the first run to reach a trial trains it, a run
that finds it held tries its other trials first and then waits, and every later run reads the finished
``trial.json``. A shared trial is reused whenever its config is unchanged (``--force`` reruns runs, not
selections; delete ``<out>/search-trials`` to choose afresh).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from .. import atomic
from ..errors import ConfigError, DataError
from ..safeio import load_json, safe_component
from ..safeio.locks import folder_lock
from ..validate import is_number
from .config.schema import STUDY_ONLY, field_at, parse_run, set_dotted
from .experiment import run_experiment
from .report.claims import LOWER_IS_BETTER
from .results import TRIALS

NOT_SEARCHABLE = ("seed", "search", "validation", "scenario")  # what the selection must not change


def _searched_keys(space: Any) -> list[str]:
    if not isinstance(space, dict):
        raise ConfigError("search: must be a mapping of dotted keys to lists of candidates, e.g. training.lr: [1e-3]")
    for key, values in space.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"search: key {key!r} is not a dotted key like 'training.lr'")
        if key.split(".")[0] in (*STUDY_ONLY, *NOT_SEARCHABLE):
            raise ConfigError(
                f"search.{key}: cannot be searched (the seed, the scenario and the study's own settings stay fixed "
                "while candidates are compared); search training or method keys, e.g. training.lr"
            )
        field_at(key)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search.{key}: must be a non-empty list of candidates, got {values!r}")
    return list(space)


def trials(cfg: dict) -> list[tuple[str, dict[str, Any]]]:
    """(trial id, {dotted key: value}) for every combination of the run's ``search`` grid, in grid order."""
    space = cfg.get("search") or {}
    keys = _searched_keys(space)
    out = []
    for k, values in enumerate(itertools.product(*(space[key] for key in keys))):
        label = "-".join(f"{key.split('.')[-1]}{value}" for key, value in zip(keys, values))
        out.append((safe_component(re.sub(r"[^A-Za-z0-9._=+-]", "", f"t{k}-{label}")), dict(zip(keys, values))))
    return out


def apply(cfg: dict, values: dict[str, Any]) -> dict:
    """The run's config with ``values`` set, validated like any run."""

    out = copy.deepcopy(cfg)
    for key, value in values.items():
        set_dotted(out, key, copy.deepcopy(value))
    run = parse_run(out)
    run.check()
    return copy.deepcopy(run.mapping)  # a plain mapping the trial may change


def selection_seed(cfg: dict) -> int:
    """The seed every trial of a ``validation.per: variant`` selection runs with."""
    seed = cfg["validation"]["seed"]
    return 0 if seed is None else seed


def trial_config(cfg: dict, values: dict[str, Any]) -> dict:
    """A trial: the run with ``values``, no search of its own, no subspace or upstream measurement; with
    ``validation.per: variant`` also the selection's seed in place of the run's."""
    out = apply(cfg, values)
    if cfg["validation"]["per"] == "variant":
        out["seed"] = selection_seed(cfg)
    out["search"] = {}
    out["subspace"]["enabled"] = False
    out["upstream"]["dataset"] = None
    return out


def check_search(cfg: dict) -> None:
    """Validate a resolved run's ``search`` and ``validation`` (every trial must be a valid run)."""
    if not cfg.get("search"):
        return
    metric, experiences = cfg["validation"]["metric"], cfg["validation"]["experiences"]
    if experiences == "first" and metric in (*LOWER_IS_BETTER, "bwt"):
        raise ConfigError(
            f"validation.metric: {metric} measures forgetting, which one experience (validation.experiences: first) "
            "cannot show; choose on acc, or set validation.experiences: all"
        )
    if experiences == "first" and cfg["training"]["pretrain"]:
        raise ConfigError(
            "validation.experiences: first would choose on the base session (training.pretrain: true trains "
            "experience 0 with full fine-tuning, not the method); set validation.experiences: all"
        )
    for _, values in trials(cfg):
        trial_config(cfg, values)


def _digest(cfg: dict) -> str:
    return hashlib.sha256(yaml.safe_dump(cfg, sort_keys=True).encode()).hexdigest()


def _finished_trial(folder: Path, digest: str) -> dict | None:
    try:
        data = load_json(folder / "trial.json", what="trial file")
    except DataError:  # not written yet, or cut short by a kill: the trial runs (again)
        return None
    if isinstance(data, dict) and data.get("config_sha256") == digest and is_number(data.get("score")):
        return data
    return None


def _run_trial(
    trial_cfg: dict, folder: Path, *, tid: str, values: dict, digest: str, run_id: str, resume: bool, progress: bool
) -> dict[str, Any]:
    validation, metric = trial_cfg["validation"], trial_cfg["validation"]["metric"]
    out = run_experiment(
        trial_cfg, folder / "run", run_id=f"{run_id}/{tid}", progress=progress, resume=resume, validation=validation
    )
    score = out["metrics"].get(metric)
    if score is None:
        raise ConfigError(f"validation.metric: trial {tid} of {run_id} has no '{metric}'")
    record = {
        "id": tid,
        "values": values,
        "config_sha256": digest,
        "seed": trial_cfg["seed"],
        "score": float(score),
        "metrics": out["metrics"],
        "validation": out.get("validation"),
        "train_s": out["timing"]["train_s"],
    }
    atomic.write_json(folder / "trial.json", record)  # written whole or not at all
    shutil.rmtree(folder / "run", ignore_errors=True)  # checkpoints and TensorBoard files of a trial
    return record


def _own_trials(cfg: dict, run_dir: Path, *, run_id: str, resume: bool, progress: bool) -> list[dict[str, Any]]:
    """``validation.per: run``: the trials live in the run's folder and belong to it."""
    root = run_dir / TRIALS
    if not resume and root.exists():
        shutil.rmtree(root)  # a fresh run starts its selection afresh, as its training does
    done = []
    for tid, values in trials(cfg):
        trial_cfg = trial_config(cfg, values)
        digest, folder = _digest(trial_cfg), root / tid
        record = _finished_trial(folder, digest) if resume else None
        if record is None:
            kw = {"tid": tid, "values": values, "digest": digest, "run_id": run_id, "resume": resume}
            record = _run_trial(trial_cfg, folder, progress=progress, **kw)
        elif progress:
            tqdm.write(f"{run_id}: trial {tid} already finished (score {record['score']:.4f}); not run again")
        done.append(record)
    return done


def _shared_trials(cfg: dict, study_dir: Path, *, run_id: str, progress: bool) -> list[dict[str, Any]]:
    """``validation.per: variant``: the trials live in the study folder, shared by the variant's seeds."""
    todo = []
    for tid, values in trials(cfg):
        trial_cfg = trial_config(cfg, values)
        digest = _digest(trial_cfg)
        todo.append((tid, values, trial_cfg, digest, study_dir / TRIALS / f"{digest[:16]}-{tid}"))
    records: dict[str, dict[str, Any]] = {}
    for blocking in (False, True):  # first the trials nobody holds, then wait for the ones another run trains
        for tid, values, trial_cfg, digest, folder in todo:
            if tid in records:
                continue
            with folder_lock(folder, blocking=blocking, what="search trial folder") as mine:
                if not mine:
                    continue
                record = _finished_trial(folder, digest)
                if record is None:
                    kw = {"tid": tid, "values": values, "digest": digest, "run_id": run_id}
                    # resume=True: a trial cut short by a kill continues; the folder's hash names its config
                    record = _run_trial(trial_cfg, folder, resume=True, progress=progress, **kw)
                elif progress:
                    tqdm.write(f"{run_id}: shared trial {tid} already chosen on (score {record['score']:.4f})")
                records[tid] = record
    return [records[tid] for tid, *_ in todo]


def run_search(cfg: dict, run_dir: Path, *, run_id: str, resume: bool, progress: bool) -> dict[str, Any]:
    """Run (or reuse) every trial of ``cfg['search']``; return results.json's search block."""
    validation = cfg["validation"]
    metric = validation["metric"]
    if validation["per"] == "variant":
        done = _shared_trials(cfg, Path(run_dir).parent, run_id=run_id, progress=progress)
    else:
        done = _own_trials(cfg, Path(run_dir), run_id=run_id, resume=resume, progress=progress)
    pick = min if metric in LOWER_IS_BETTER else max
    best = pick(range(len(done)), key=lambda i: (done[i]["score"], -i) if pick is max else (done[i]["score"], i))
    return {
        "space": cfg["search"],
        "metric": metric,
        "direction": "lower" if metric in LOWER_IS_BETTER else "higher",
        "validation": done[best].get("validation") or dict(validation),
        "per": validation["per"],
        "seed": done[best].get("seed"),  # the trials' seed (the selection's, with per: variant)
        "trials": [{k: r[k] for k in ("id", "values", "score", "train_s")} for r in done],
        "chosen": done[best]["values"],
        "chosen_score": done[best]["score"],
        # How many trials share the best score: with more than one the split did not tell them apart and the
        # first in grid order was taken (the report says so).
        "tied": sum(r["score"] == done[best]["score"] for r in done),
    }


def run_with_search(cfg: dict, run_dir: Path, *, run_id: str, progress: bool, resume: bool) -> dict:
    """:func:`run_experiment`, preceded by the validation search when the run has one."""
    if not cfg.get("search"):
        return run_experiment(cfg, run_dir, run_id=run_id, progress=progress, resume=resume)
    block = run_search(cfg, Path(run_dir), run_id=run_id, resume=resume, progress=progress)
    final = apply(cfg, block["chosen"])
    return run_experiment(final, run_dir, run_id=run_id, progress=progress, resume=resume, extra={"search": block})
