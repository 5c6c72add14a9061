"""Resumable run state on disk: the bytes that let a run continue after its last completed experience.

After each experience (trained and evaluated) ``state_<t>.pt`` is written atomically with the run's state
(:meth:`.parts.RunParts.state_dict`: model, adapter description, optimizer, clock, strategy and plugin
bookkeeping) and every RNG state. A SHA-256 of the file's bytes is stored inside a small sidecar written
after it, so a truncated or corrupted file is detected on resume and never loaded; the previous state is
used instead (that experience is retrained). The two most recent states are kept.

The strategy's own state (replay buffers, EWC/SI/MAS/RWalk importances, LwF's previous model, GEM
memories…) is saved through its registry entry (``spec.state_dict``, :mod:`avl_peft.cl.strategies.state`),
with Avalanche's clock (experience and iteration counters, which EWC & co. index by). Exactness: for a
strategy whose registry entry is ``resumable``, a resumed run continues as the uninterrupted one would
(bit-for-bit on CPU; the tests compare the accuracy matrices to 1e-6). A strategy that is not restarts an
interrupted run from its first experience, and says so — still nothing finished is lost.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import atomic

KEEP = 2
FORMAT = 2  # 2: strategy state, clock and lineage saved


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, numbers and lists, so the state file loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(run_dir: Path, experience: int, payload: dict[str, Any]) -> Path:
    """Write ``state_<t>.pt`` and its checksum sidecar; keep the newest KEEP states."""
    data = atomic.torch_bytes(payload)
    path = run_dir / f"state_{experience}.pt"
    atomic.write_bytes(path, data)
    atomic.write_bytes(path.with_suffix(".sha256"), _digest(data).encode())
    for old in sorted(run_dir.glob("state_*.pt"), key=_index)[:-KEEP]:
        old.unlink(missing_ok=True)
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


def _index(path: Path) -> int:
    try:
        return int(path.stem.split("_")[1])
    except (IndexError, ValueError):
        return -1


def load_latest_state(run_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest intact state (or None) and a note for every state found corrupted and skipped."""
    notes = []
    for path in sorted(run_dir.glob("state_*.pt"), key=_index, reverse=True):
        sidecar = path.with_suffix(".sha256")
        try:
            data = path.read_bytes()
            expected = sidecar.read_text().strip()
        except OSError as e:
            notes.append(f"{path.name}: unreadable ({e.strerror or e}); ignored")
            continue
        if _digest(data) != expected:
            notes.append(f"{path.name}: checksum mismatch (truncated or corrupted); ignored, retraining from earlier")
            continue
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), notes
        except Exception as e:  # checksum fine but unloadable: written by another version
            notes.append(f"{path.name}: cannot be loaded ({type(e).__name__}: {e}); ignored")
    return None, notes


def clear_states(run_dir: Path) -> None:
    for path in run_dir.glob("state_*"):
        path.unlink(missing_ok=True)


def save_run_state(run_dir: Path, t: int, state: dict[str, Any]) -> None:
    """Write the run's ``state`` (:meth:`.parts.RunParts.state_dict`) after experience ``t``, with every RNG."""
    save_state(run_dir, t, {"format": FORMAT, "experience": t, **state, "rng": rng_state()})


def load_run_state(run_dir: Path) -> dict[str, Any] | None:
    """The newest intact state written by :func:`save_run_state` in ``run_dir``, or None (notes printed)."""
    state, notes = load_latest_state(run_dir)
    for note in notes:
        tqdm.write(f"resume {run_dir.name}: {note}")
    if state is None:
        return None
    if state.get("format") != FORMAT:
        tqdm.write(f"resume {run_dir.name}: saved state was written by another avl-peft version; starting over")
        return None
    return state
