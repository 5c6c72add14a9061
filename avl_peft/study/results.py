"""The one definition of ``results.json``: its schema version, its two shapes, writing and reading.

Every run folder ends with a ``results.json`` (written atomically, last, so its presence with
``status: finished`` means the run is complete). Schema version 2 (docs/design.md has the field list):

* ``finished``: ``schema``, ``status``, ``run`` (id, method, strategy, seed, policy, options), ``config``,
  ``versions``, ``params``, ``budget``, ``backbone_weights`` (optional), ``classes_order``,
  ``accuracy_matrix`` (``class_incremental`` and ``task_aware``), ``metrics``, ``avalanche_metrics``,
  ``subspace``, ``subspace_layers``, ``upstream`` (optional), ``heads`` (optional), ``timing``
  and, after a resume, ``resumed_at_experience``;
* ``failed``: ``schema``, ``status``, ``error``, ``run``, ``config``.

Version 1 files (before ``upstream``/``heads``) are still read. The writer (:mod:`.experiment`), the
runner (:func:`read_status`) and the report (:func:`read_results`) all go through this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..safeio import load_json, write_text_nofollow

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
FILENAME = "results.json"
TRIALS = "search-trials"  # a run's validation-search trials (study/search.py); not runs of the study
STATUSES = ("finished", "failed")


def run_info(run_id: str, cfg: dict, options: dict | None = None) -> dict[str, Any]:
    """The ``run`` block: what distinguishes this run within its study (``options``: the resolved ones)."""
    return {
        "id": run_id,
        "method": cfg["method"]["name"],
        "strategy": cfg["strategy"]["name"],
        "seed": cfg["seed"],
        "policy": cfg["method"]["policy"],
        "options": options if options is not None else cfg["method"]["options"],
    }


def failed(run_id: str, cfg: dict, message: str) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "status": "failed", "error": message, "run": run_info(run_id, cfg), "config": cfg}


def write(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``run_dir/results.json`` atomically (fsync, then rename); return its path.

    The run folder must not be a symbolic link (ConfigError): the write stays inside the output folder.
    """
    path = Path(run_dir) / FILENAME
    write_text_nofollow(path, json.dumps(results, indent=2, default=float), root=Path(run_dir).parent)
    return path


def signature(run_dir: Path) -> str:
    """What ``run_dir/results.json`` is right now: ``absent`` or its inode, size and modification time.

    Every write replaces the file (a new inode), so two signatures differ exactly when it was (re)written
    in between; the runner uses this to notice runs another process did while this one waited.
    """
    try:
        info = os.stat(Path(run_dir) / FILENAME, follow_symlinks=False)
    except FileNotFoundError:
        return "absent"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return f"{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


def modified_ns(run_dir: Path) -> int | None:
    """When ``run_dir/results.json`` was last written (ns since the epoch), or None if there is none."""
    try:
        return os.stat(Path(run_dir) / FILENAME, follow_symlinks=False).st_mtime_ns
    except OSError:
        return None


def read(path: str | Path) -> dict[str, Any]:
    """A results.json as a dict, checked for its envelope (object, known schema, known status).

    Raises DataError naming the file and what is wrong (bounded in size and nesting, never a traceback
    from the JSON parser). Field-level checks are the reader's: the report tolerates missing optionals.
    """
    path = Path(path)
    try:
        # Bounded: at most 32 MiB, 100 levels and 500,000 values (safeio's JSON limits), checked before the
        # recursive parser runs, so a hostile file (200,000 nested '[' or a 1500 x 1500 matrix) is refused.
        data = load_json(path, what="results file")
    except DataError as exc:
        raise DataError(f"{path}: {str(exc).replace(f'results file {str(path)!r} ', '', 1)}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level is not a JSON object")
    if data.get("schema") not in READABLE_SCHEMAS:
        raise DataError(
            f"{path}: unsupported schema {data.get('schema')!r} (this version reads {list(READABLE_SCHEMAS)})"
        )
    if data.get("status") not in STATUSES:
        raise DataError(f"{path}: 'status' is {data.get('status')!r}, expected one of {list(STATUSES)}")
    return data


def read_status(run_dir: Path) -> str | None:
    """'finished', 'failed' or None (never started, interrupted, or unreadable)."""
    try:
        return read(Path(run_dir) / FILENAME)["status"]
    except DataError:
        return None
