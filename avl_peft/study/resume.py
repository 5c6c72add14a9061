"""Resumable run state: everything needed to continue a run after its last completed experience.

After each experience (trained and evaluated) ``state_<t>.pt`` is written atomically with the whole model
state, the injected adapter's description, the optimizer state keyed by parameter *name* (Avalanche
rebuilds parameter groups, so positions are not stable), every RNG state, and the bookkeeping of our
plugins. A SHA-256 of the file's bytes is stored inside a small sidecar written after it, so a truncated
or corrupted file is detected on resume and never loaded; the previous state is used instead (that
experience is retrained). The two most recent states are kept.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import atomic
from ..adapters.inject import injection, lineage
from ..cl.checkpoints import rebuild_model
from ..cl.strategies.state import set_trainable
from ..errors import ConfigError

if TYPE_CHECKING:
    from .experiment import RunParts

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


def optimizer_state(strategy: Any) -> dict[str, Any]:
    """Optimizer state keyed by parameter name (Avalanche's name -> parameter map)."""
    names = {id(p): n for n, p in (strategy.optimized_param_id or {}).items()}
    current = dict(strategy.model.named_parameters())
    # Only states Avalanche would carry into the next experience: a parameter the model has replaced
    # since (a grown classifier) gets fresh state there, so it must get fresh state after a resume too.
    per_param = {
        names[id(p)]: s
        for p, s in strategy.optimizer.state.items()
        if id(p) in names and current.get(names[id(p)]) is p
    }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in strategy.optimizer.param_groups]
    return {"per_param": per_param, "groups": groups}


def load_optimizer_state(strategy: Any, saved: dict[str, Any]) -> None:
    """Rebuild the optimizer over the model's parameters and put each parameter's state back by name."""
    strategy.optimized_param_id = None
    strategy.make_optimizer(reset_optimizer_state=True)
    for group, hyper in zip(strategy.optimizer.param_groups, saved["groups"]):
        group.update(hyper)
    for name, param in strategy.optimized_param_id.items():
        if name in saved["per_param"]:
            strategy.optimizer.state[param] = {
                k: v.to(param.device) if torch.is_tensor(v) else v for k, v in saved["per_param"][name].items()
            }


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


def clock_state(strategy: Any) -> dict[str, int]:
    """Avalanche's clock: experience/epoch/iteration counters (EWC, SI… index their state by them)."""
    clock = getattr(strategy, "clock", None)
    return {} if clock is None else {k: int(v) for k, v in vars(clock).items() if isinstance(v, int)}


def set_clock_state(strategy: Any, state: dict[str, int]) -> None:
    for key, value in state.items():
        setattr(strategy.clock, key, value)


def save_run_state(run_dir: Path, t: int, parts: RunParts, progress_state: dict) -> None:
    """Everything needed to continue after experience ``t``: model, optimizer, RNGs, plugin bookkeeping."""
    strategy = parts.strategy
    payload = {
        "format": FORMAT,
        "experience": t,
        "model": {k: v.detach().cpu() for k, v in strategy.model.state_dict().items()},
        "injected": injection(strategy.model),
        "lineage": lineage(strategy.model),
        # What trains is not in a state dict, and strategies change it (LFL freezes the last layer).
        "trainable": [n for n, p in strategy.model.named_parameters() if p.requires_grad],
        "clock": clock_state(strategy),
        "strategy": parts.spec.state_dict(strategy),
        "optimizer": optimizer_state(strategy),
        "rng": rng_state(),
        "matrix": parts.matrix.state_dict(),
        "plugins": {name: plugin.state_dict() for name, plugin in parts.stateful.items()},
        "progress": progress_state,
    }
    save_state(run_dir, t, payload)


def restore_run_state(run_dir: Path, parts: RunParts) -> tuple[int, dict] | None:
    """Load the newest intact state into a freshly built run; the next experience index and progress."""
    state, notes = load_latest_state(run_dir)
    for note in notes:
        tqdm.write(f"resume {run_dir.name}: {note}")
    if state is None:
        return None
    if state.get("format") != FORMAT:
        tqdm.write(f"resume {run_dir.name}: saved state was written by another avl-peft version; starting over")
        return None
    strategy = parts.strategy
    model = strategy.model
    rebuild_model(
        model, state["injected"], state["model"], lineage=state["lineage"], experiences=parts.benchmark.test_stream
    )
    set_trainable(model, state["trainable"])
    model.to(parts.device)
    load_optimizer_state(strategy, state["optimizer"])
    parts.matrix.load_state_dict(state["matrix"])
    set_clock_state(strategy, state["clock"])
    parts.spec.load_state_dict(strategy, state["strategy"], parts.context)
    saved = state.get("plugins", {})
    missing = sorted(set(parts.stateful) - set(saved))
    if missing:  # written by a run configured differently: its bookkeeping cannot be trusted
        raise ConfigError(f"saved run state in '{run_dir}' has no state for {', '.join(missing)}; rerun with --force")
    for name, plugin in parts.stateful.items():
        plugin.load_state_dict(saved[name])
    set_rng_state(state["rng"])
    return state["experience"] + 1, state["progress"]
