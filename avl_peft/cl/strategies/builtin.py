"""Avalanche's own strategies, registered with their options: the adapter plugin composes with each."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

from avalanche.training import AGEM, EWC, GEM, Naive, Replay, SynapticIntelligence
from avalanche.training import LwF as AvalancheLwF

from ...validate import check_int, check_number
from .base import STRATEGIES, StrategySpec


def _simple(cls: type, *, memory: bool = False) -> Callable[..., Any]:
    def build(model, optimizer, criterion, **kw):
        if memory and getattr(criterion, "mask", None) in ("new", "old"):
            # MaskedCrossEntropy(mask="new") keeps only the current classes' logits AND targets: a stored
            # sample of an earlier class gets an all-zero target row, so it adds no loss (replay) and no
            # reference gradient (GEM/A-GEM). The memory would silently do nothing.
            warnings.warn(
                f"strategy '{cls.__name__}' replays stored samples of earlier classes, but the loss only sees "
                "the current experience's classes (training.train_mask: current), so the memory has no effect; "
                "use training.train_mask: seen",
                stacklevel=2,
            )
        return cls(model=model, optimizer=optimizer, criterion=criterion, **kw)

    return build


@dataclasses.dataclass
class NoOptions:
    pass


@dataclasses.dataclass
class ReplayOptions:
    mem_size: int = 200  # stored samples in total, class-balanced

    def __post_init__(self) -> None:
        check_int("strategy.options.mem_size", self.mem_size, minimum=1)


@dataclasses.dataclass
class EWCOptions:
    ewc_lambda: float = 100.0  # penalty weight on the Fisher-weighted drift of important parameters

    def __post_init__(self) -> None:
        check_number("strategy.options.ewc_lambda", self.ewc_lambda, low=0.0)


@dataclasses.dataclass
class LwFOptions:
    alpha: float = 1.0  # distillation weight
    temperature: float = 2.0  # softmax temperature of the distillation targets

    def __post_init__(self) -> None:
        check_number("strategy.options.alpha", self.alpha, low=0.0)
        check_number("strategy.options.temperature", self.temperature, low=0.0, exclusive_low=True)


@dataclasses.dataclass
class SIOptions:
    si_lambda: float = 0.1  # penalty weight on the path-integral importance

    def __post_init__(self) -> None:
        check_number("strategy.options.si_lambda", self.si_lambda, low=0.0)


@dataclasses.dataclass
class AGEMOptions:
    patterns_per_exp: int = 64  # stored samples per experience
    sample_size: int = 64  # memory samples drawn for each reference gradient

    def __post_init__(self) -> None:
        check_int("strategy.options.patterns_per_exp", self.patterns_per_exp, minimum=1)
        check_int("strategy.options.sample_size", self.sample_size, minimum=1)


@dataclasses.dataclass
class GEMOptions:
    patterns_per_exp: int = 64  # stored samples per experience
    memory_strength: float = 0.5  # margin added to the projected gradient's constraints

    def __post_init__(self) -> None:
        check_int("strategy.options.patterns_per_exp", self.patterns_per_exp, minimum=1)
        check_number("strategy.options.memory_strength", self.memory_strength, low=0.0)


for spec in (
    StrategySpec("naive", "fine-tune on each experience in turn (Avalanche Naive)", _simple(Naive), NoOptions,
                 resumable=True),
    StrategySpec("replay", "experience replay with a class-balanced memory (mem_size)", _simple(Replay, memory=True),
                 ReplayOptions, uses_memory=True),
    StrategySpec("ewc", "Elastic Weight Consolidation (ewc_lambda)", _simple(EWC), EWCOptions),
    StrategySpec("lwf", "Learning without Forgetting distillation (alpha, temperature)", _simple(AvalancheLwF),
                 LwFOptions),
    StrategySpec("si", "Synaptic Intelligence (si_lambda)", _simple(SynapticIntelligence), SIOptions),
    StrategySpec("agem", "Averaged GEM (patterns_per_exp, sample_size)", _simple(AGEM, memory=True), AGEMOptions,
                 uses_memory=True),
    StrategySpec("gem", "Gradient Episodic Memory, needs quadprog (patterns_per_exp, memory_strength)",
                 _simple(GEM, memory=True), GEMOptions, uses_memory=True),
):  # fmt: skip
    STRATEGIES.register(spec.name, spec.description)(spec)
