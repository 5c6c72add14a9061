"""What one run is made of (:class:`RunParts`, wired by :func:`.experiment.build`) and its resumable state.

:meth:`RunParts.state_dict` holds everything a run needs to continue after an experience except the
process's RNGs: the whole model state, the injected adapter's description and lineage, what trains, the
optimizer state keyed by parameter *name* (Avalanche rebuilds parameter groups, so positions are not
stable), Avalanche's clock, the strategy's own state (through its registry entry, ``spec.state_dict``) and
the bookkeeping of the stateful plugins. :mod:`.resume` stores it as checksummed bytes, with the RNGs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..adapters.inject import injection, lineage
from ..cl.checkpoints import rebuild_model
from ..cl.evaluation import AccuracyMatrixPlugin
from ..cl.plugin import PEFTPlugin
from ..cl.strategies import StrategySpec
from ..cl.strategies.state import StateContext, set_trainable
from ..errors import ConfigError
from ..instruments.tracker import SubspaceTracker
from ..validate import is_int


@dataclasses.dataclass
class RunParts:
    """Everything one run is made of, wired together by :func:`.experiment.build`."""

    model: torch.nn.Module
    benchmark: Any
    strategy: Any
    matrix: AccuracyMatrixPlugin
    peft: PEFTPlugin
    evaluator: Any
    device: torch.device
    tracker: SubspaceTracker | None
    budget: dict[str, Any] | None
    # Plugins whose bookkeeping a resumed run must get back: name -> object with state_dict()/load_state_dict().
    stateful: dict[str, Any] = dataclasses.field(default_factory=dict)
    spec: StrategySpec | None = None  # the strategy's registry entry (its state is saved through it)
    context: StateContext | None = None  # what restoring the strategy's state needs (datasets, fresh models)
    weights: dict[str, Any] | None = None  # where the backbone weights came from (weights_provenance)
    precision: str = "fp32"  # training.precision as resolved on this machine (auto -> bf16 or fp32)

    def state_dict(self, progress: dict[str, Any]) -> dict[str, Any]:
        """Everything but the RNGs needed to continue after the current experience; ``progress`` is the run's
        own bookkeeping (timings, counts), returned as it was by :meth:`load_state_dict`."""
        strategy = self.strategy
        return {
            "model": {k: v.detach().cpu() for k, v in strategy.model.state_dict().items()},
            "injected": injection(strategy.model),
            "lineage": lineage(strategy.model),
            # What trains is not in a state dict, and strategies change it (LFL freezes the last layer).
            "trainable": [n for n, p in strategy.model.named_parameters() if p.requires_grad],
            "clock": clock_state(strategy),
            "strategy": self.spec.state_dict(strategy),
            "optimizer": optimizer_state(strategy),
            "matrix": self.matrix.state_dict(),
            "plugins": {name: plugin.state_dict() for name, plugin in self.stateful.items()},
            "progress": progress,
        }

    def load_state_dict(self, state: dict[str, Any], where: str | Path = "the run folder") -> dict[str, Any]:
        """Put a :meth:`state_dict` back into this freshly built run; return its ``progress``."""
        strategy = self.strategy
        model = strategy.model
        rebuild_model(
            model, state["injected"], state["model"], lineage=state["lineage"], experiences=self.benchmark.test_stream
        )
        set_trainable(model, state["trainable"])
        model.to(self.device)
        load_optimizer_state(strategy, state["optimizer"])
        self.matrix.load_state_dict(state["matrix"])
        set_clock_state(strategy, state["clock"])
        self.spec.load_state_dict(strategy, state["strategy"], self.context)
        saved = state.get("plugins", {})
        missing = sorted(set(self.stateful) - set(saved))
        if missing:  # written by a run configured differently: its bookkeeping cannot be trusted
            raise ConfigError(f"saved run state in '{where}' has no state for {', '.join(missing)}; rerun with --force")
        for name, plugin in self.stateful.items():
            plugin.load_state_dict(saved[name])
        return state["progress"]


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


def clock_state(strategy: Any) -> dict[str, int]:
    """Avalanche's clock: experience/epoch/iteration counters (EWC, SI… index their state by them)."""
    clock = getattr(strategy, "clock", None)
    return {} if clock is None else {k: int(v) for k, v in vars(clock).items() if is_int(v)}


def set_clock_state(strategy: Any, state: dict[str, int]) -> None:
    for key, value in state.items():
        setattr(strategy.clock, key, value)
