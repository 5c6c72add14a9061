"""Continual-learning strategies by name: Avalanche's own, with the adapter plugin composed in.

Each builder gets the model, optimizer, criterion and the shared template arguments and returns an
Avalanche strategy. ``l2p`` (Avalanche's LearningToPrompt) brings its own prompted ViT and is a baseline.
"""

from __future__ import annotations

from typing import Any, Callable

from avalanche.training import AGEM, EWC, GEM, Naive, Replay, SynapticIntelligence
from avalanche.training import LwF as AvalancheLwF

from .registry import Registry, suggest
from .errors import ConfigError

STRATEGIES: Registry[Callable[..., Any]] = Registry("strategy")

# Allowed options per strategy, with defaults (a typo gets a did-you-mean, not a TypeError from avalanche).
STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {
    "naive": {},
    "replay": {"mem_size": 200},
    "ewc": {"ewc_lambda": 100.0},
    "lwf": {"alpha": 1.0, "temperature": 2.0},
    "si": {"si_lambda": 0.1},
    "agem": {"patterns_per_exp": 64, "sample_size": 64},
    "gem": {"patterns_per_exp": 64, "memory_strength": 0.5},
    "l2p": {"pool_size": 10, "prompt_length": 5, "top_k": 5, "lr": 0.03},
}


def strategy_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Merge user options over the defaults, rejecting unknown names."""
    allowed = STRATEGY_OPTIONS[name]
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"strategy '{name}' has no option '{key}'. Allowed: {', '.join(allowed) or '(none)'}."
                f"{suggest(key, list(allowed))}"
            )
    return {**allowed, **options}


def _simple(cls: type) -> Callable[..., Any]:
    def build(model, optimizer, criterion, **kw):
        return cls(model=model, optimizer=optimizer, criterion=criterion, **kw)

    return build


STRATEGIES.register("naive", "fine-tune on each experience in turn (Avalanche Naive)")(_simple(Naive))
STRATEGIES.register("replay", "experience replay with a class-balanced memory (mem_size)")(_simple(Replay))
STRATEGIES.register("ewc", "Elastic Weight Consolidation (ewc_lambda)")(_simple(EWC))
STRATEGIES.register("lwf", "Learning without Forgetting distillation (alpha, temperature)")(_simple(AvalancheLwF))
STRATEGIES.register("si", "Synaptic Intelligence (si_lambda)")(_simple(SynapticIntelligence))
STRATEGIES.register("agem", "Averaged GEM (patterns_per_exp, sample_size)")(_simple(AGEM))
STRATEGIES.register("gem", "Gradient Episodic Memory, needs quadprog (patterns_per_exp, memory_strength)")(
    _simple(GEM)
)
