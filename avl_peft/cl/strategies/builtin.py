"""Avalanche's own strategies, registered with their options and where their state lives.

Each entry builds the Avalanche strategy the way its own constructor would, with the run's plugins first
(so :class:`~avl_peft.cl.plugin.PEFTPlugin` injects before a strategy's own plugins look at the model),
and names the attributes that carry what the strategy learned across experiences (``state``), which a
resumed run restores (:mod:`.state`). Strategies without a class of their own in Avalanche (RWalk, MIR
with :class:`~avl_peft.cl.composition.TrainableMIRPlugin`) are Naive plus their plugin, which is what
Avalanche's class would be.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

from avalanche.benchmarks.utils.data_loader import GroupBalancedInfiniteDataLoader
from avalanche.training import (
    AGEM,
    ER_ACE,
    EWC,
    GEM,
    LFL,
    MAS,
    MER,
    Cumulative,
    FromScratchTraining,
    GDumb,
    Naive,
    Replay,
    SynapticIntelligence,
)
from avalanche.training import LwF as AvalancheLwF
from avalanche.training.plugins import (
    AGEMPlugin,
    EWCPlugin,
    FromScratchTrainingPlugin,
    GDumbPlugin,
    GEMPlugin,
    LFLPlugin,
    LwFPlugin,
    MASPlugin,
    ReplayPlugin,
    RWalkPlugin,
    SynapticIntelligencePlugin,
)

from ...adapters import METHODS
from ...errors import ConfigError
from ...validate import check_bool, check_int, check_number
from ..composition import TrainableMIRPlugin
from .base import STRATEGIES, StrategySpec
from .state import StatePart, itself, plugin


def _warn_if_memory_unseen(name: str, criterion: Any) -> None:
    if getattr(criterion, "mask", None) in ("new", "old"):
        # MaskedCrossEntropy(mask="new") keeps only the current classes' logits AND targets: a stored
        # sample of an earlier class gets an all-zero target row, so it adds no loss (replay) and no
        # reference gradient (GEM/A-GEM). The memory would silently do nothing.
        warnings.warn(
            f"strategy '{name}' replays stored samples of earlier classes, but the loss only sees the current "
            "experience's classes (training.train_mask: current), so the memory has no effect; use "
            "training.train_mask: seen",
            stacklevel=3,
        )


def _simple(cls: type, *, memory: bool = False) -> Callable[..., Any]:
    def build(model, optimizer, criterion, **kw):
        if memory:
            _warn_if_memory_unseen(cls.__name__, criterion)
        return cls(model=model, optimizer=optimizer, criterion=criterion, **kw)

    return build


def _with_plugin(make: Callable[..., Any], *, memory: bool = False) -> Callable[..., Any]:
    """Naive with a strategy plugin appended after the run's plugins (``make(**options)`` builds it)."""

    def build(model, optimizer, criterion, *, plugins=None, **kw):
        names = {f.name for f in dataclasses.fields(make.options)}  # type: ignore[attr-defined]
        options = {k: kw.pop(k) for k in list(kw) if k in names}
        if memory:
            _warn_if_memory_unseen(make.__name__, criterion)
        return Naive(
            model=model, optimizer=optimizer, criterion=criterion, plugins=[*(plugins or []), make(**options)], **kw
        )

    return build


def _continue_only(name: str) -> Callable[[dict], None]:
    """Path-integral importances (SI, RWalk) follow one set of parameters along its trajectory; a merge, a
    new branch or the end of a base session swaps those parameters mid-way and the importances become
    meaningless, so only ``policy: continue`` without a base session is allowed."""

    def check(cfg: dict) -> None:
        if cfg["method"]["policy"] != "continue" or cfg["training"]["pretrain"]:
            raise ConfigError(
                f"strategy {name} accumulates importances along the trained parameters' path, which a merge, a "
                "new branch or the end of a base session replaces: use method.policy: continue and "
                "training.pretrain: false with it (or ewc/mas, which measure importance at the end point)"
            )

    return check


def _lfl_check(cfg: dict) -> None:
    """LFL freezes the model's last linear layer after each experience: a method must train more than that."""
    cls = METHODS.get(cfg["method"]["name"])
    if not (cls.adds_adapter or cls.trains_backbone):
        raise ConfigError(
            "strategy lfl freezes the classifier after the first experience, so with a method that trains only the "
            "head nothing would train; pick an adapter method or full"
        )


# -- options ---------------------------------------------------------------------------------------------


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


@dataclasses.dataclass
class MASOptions:
    lambda_reg: float = 1.0  # penalty weight on the output-sensitivity importance
    alpha: float = 0.5  # weight of the earlier importance in its running average

    def __post_init__(self) -> None:
        check_number("strategy.options.lambda_reg", self.lambda_reg, low=0.0)
        check_number("strategy.options.alpha", self.alpha, low=0.0, high=1.0)


@dataclasses.dataclass
class RWalkOptions:
    ewc_lambda: float = 0.1  # penalty weight
    ewc_alpha: float = 0.9  # moving-average factor of the Fisher importance (EWC++)
    delta_t: int = 10  # iterations between path-score updates

    def __post_init__(self) -> None:
        check_number("strategy.options.ewc_lambda", self.ewc_lambda, low=0.0)
        check_number("strategy.options.ewc_alpha", self.ewc_alpha, low=0.0, high=1.0)
        check_int("strategy.options.delta_t", self.delta_t, minimum=1)


@dataclasses.dataclass
class MIROptions:
    mem_size: int = 200  # stored samples in total, class-balanced
    subsample: int = 50  # memory samples scored per step
    batch_size_mem: int = 10  # most-interfered samples replayed per step

    def __post_init__(self) -> None:
        check_int("strategy.options.mem_size", self.mem_size, minimum=1)
        check_int("strategy.options.subsample", self.subsample, minimum=1)
        check_int("strategy.options.batch_size_mem", self.batch_size_mem, minimum=1)
        if self.batch_size_mem > self.subsample:
            raise ConfigError(
                f"strategy.options.batch_size_mem ({self.batch_size_mem}) cannot exceed subsample ({self.subsample})"
            )


@dataclasses.dataclass
class ERACEOptions:
    mem_size: int = 200  # stored samples in total, class-balanced
    batch_size_mem: int = 10  # memory samples per step

    def __post_init__(self) -> None:
        check_int("strategy.options.mem_size", self.mem_size, minimum=1)
        check_int("strategy.options.batch_size_mem", self.batch_size_mem, minimum=1)


@dataclasses.dataclass
class LFLOptions:
    lambda_e: float = 0.1  # weight of the feature-distance (less-forgetful) penalty

    def __post_init__(self) -> None:
        check_number("strategy.options.lambda_e", self.lambda_e, low=0.0)


@dataclasses.dataclass
class MEROptions:
    mem_size: int = 200  # reservoir memory size
    batch_size_mem: int = 10  # memory samples mixed into each step
    n_inner_steps: int = 5  # within-batch Reptile steps
    beta: float = 0.1  # within-batch meta step size
    gamma: float = 0.1  # across-batch meta step size

    def __post_init__(self) -> None:
        check_int("strategy.options.mem_size", self.mem_size, minimum=1)
        check_int("strategy.options.batch_size_mem", self.batch_size_mem, minimum=1)
        check_int("strategy.options.n_inner_steps", self.n_inner_steps, minimum=1)
        check_number("strategy.options.beta", self.beta, low=0.0, exclusive_low=True)
        check_number("strategy.options.gamma", self.gamma, low=0.0, exclusive_low=True)


@dataclasses.dataclass
class FromScratchOptions:
    reset_optimizer: bool = True  # fresh optimizer state at every experience

    def __post_init__(self) -> None:
        check_bool("strategy.options.reset_optimizer", self.reset_optimizer)


def _rwalk(**options: Any) -> RWalkPlugin:
    return RWalkPlugin(**options)


_rwalk.options = RWalkOptions  # type: ignore[attr-defined]


def _mir(**options: Any) -> TrainableMIRPlugin:
    return TrainableMIRPlugin(**options)


_mir.options = MIROptions  # type: ignore[attr-defined]


# -- what each strategy keeps across experiences ---------------------------------------------------------


def _agem_loader(agem: AGEMPlugin) -> None:
    """A-GEM's infinite memory loader, rebuilt over the restored buffers exactly as ``update_memory`` does
    (creating it draws no random numbers: sampling starts with the next experience)."""
    if agem.buffers:
        agem.buffer_dataloader = GroupBalancedInfiniteDataLoader(
            agem.buffers,
            batch_size=agem.sample_size // len(agem.buffers),
            num_workers=0,
            pin_memory=False,
            persistent_workers=False,
        )
        agem.buffer_dliter = iter(agem.buffer_dataloader)


REPLAY_STATE = (StatePart(plugin(ReplayPlugin), ("storage_policy",)),)
EWC_STATE = (StatePart(plugin(EWCPlugin), ("saved_params", "importances")),)
LWF_STATE = (StatePart(lambda s: plugin(LwFPlugin)(s).lwf, ("prev_model", "expcount", "prev_classes_by_task")),)
SI_STATE = (StatePart(plugin(SynapticIntelligencePlugin), ("ewc_data", "syn_data")),)
AGEM_STATE = (StatePart(plugin(AGEMPlugin), ("buffers",), rebuild=_agem_loader),)
GEM_STATE = (StatePart(plugin(GEMPlugin), ("memory_x", "memory_y", "memory_tid")),)
MAS_STATE = (StatePart(plugin(MASPlugin), ("params", "importance")),)
RWALK_STATE = (
    StatePart(plugin(RWalkPlugin), ("iter_importance", "exp_scores", "exp_params", "exp_importance", "exp_penalties")),
)
MIR_STATE = (
    StatePart(plugin(TrainableMIRPlugin), ("storage_policy", "replay_buffer"), rebuild=TrainableMIRPlugin.rebuild),
)
BUFFER_STATE = (StatePart(itself, ("storage_policy",)),)  # ER-ACE: the loader is rebuilt every experience
CUMULATIVE_STATE = (StatePart(itself, ("dataset",)),)
GDUMB_STATE = (StatePart(plugin(GDumbPlugin), ("storage_policy", "init_model")),)
MER_STATE = (StatePart(lambda s: s.buffer, ("storage_policy",)),)
LFL_STATE = (StatePart(plugin(LFLPlugin), ("prev_model",)),)
FROM_SCRATCH_STATE = (StatePart(plugin(FromScratchTrainingPlugin), ("initial_weights",)),)


for spec in (
    StrategySpec("naive", "fine-tune on each experience in turn (Avalanche Naive)", _simple(Naive), NoOptions,
                 avalanche="Naive"),
    StrategySpec("replay", "experience replay with a class-balanced memory (mem_size)", _simple(Replay, memory=True),
                 ReplayOptions, uses_memory=True, state=REPLAY_STATE, avalanche="Replay",
                 tiny_options={"mem_size": 8}),
    StrategySpec("cumulative", "retrain on every experience seen so far (upper bound; Avalanche Cumulative)",
                 _simple(Cumulative, memory=True), NoOptions, uses_memory=True, state=CUMULATIVE_STATE,
                 avalanche="Cumulative"),
    StrategySpec("from_scratch", "reset the model before each experience (lower bound; reset_optimizer)",
                 _simple(FromScratchTraining), FromScratchOptions, state=FROM_SCRATCH_STATE,
                 avalanche="FromScratchTraining"),
    StrategySpec("ewc", "Elastic Weight Consolidation (ewc_lambda)", _simple(EWC), EWCOptions, state=EWC_STATE,
                 avalanche="EWC"),
    StrategySpec("mas", "Memory Aware Synapses (lambda_reg, alpha)", _simple(MAS), MASOptions, state=MAS_STATE,
                 avalanche="MAS"),
    StrategySpec("si", "Synaptic Intelligence (si_lambda); policy continue only", _simple(SynapticIntelligence),
                 SIOptions, state=SI_STATE, check=_continue_only("si"), avalanche="SynapticIntelligence"),
    StrategySpec("rwalk", "Riemannian Walk (ewc_lambda, ewc_alpha, delta_t); policy continue only",
                 _with_plugin(_rwalk), RWalkOptions, state=RWALK_STATE, check=_continue_only("rwalk"),
                 tiny_options={"delta_t": 2}),
    StrategySpec("lwf", "Learning without Forgetting distillation (alpha, temperature)", _simple(AvalancheLwF),
                 LwFOptions, state=LWF_STATE, avalanche="LwF"),
    StrategySpec("agem", "Averaged GEM (patterns_per_exp, sample_size)", _simple(AGEM, memory=True), AGEMOptions,
                 uses_memory=True, state=AGEM_STATE, avalanche="AGEM",
                 tiny_options={"patterns_per_exp": 4, "sample_size": 4}),
    StrategySpec("gem", "Gradient Episodic Memory, needs quadprog (patterns_per_exp, memory_strength)",
                 _simple(GEM, memory=True), GEMOptions, uses_memory=True, state=GEM_STATE, avalanche="GEM",
                 tiny_options={"patterns_per_exp": 4}),
    StrategySpec("mir", "Maximally Interfered Retrieval replay (mem_size, subsample, batch_size_mem)",
                 _with_plugin(_mir, memory=True), MIROptions, uses_memory=True, state=MIR_STATE, avalanche="MIR",
                 tiny_options={"mem_size": 8, "subsample": 6, "batch_size_mem": 2}),
    StrategySpec("er_ace", "ER with asymmetric cross-entropy (mem_size, batch_size_mem)",
                 _simple(ER_ACE, memory=True), ERACEOptions, uses_memory=True, state=BUFFER_STATE,
                 avalanche="ER_ACE",
                 tiny_options={"mem_size": 8, "batch_size_mem": 2}),
    StrategySpec("lfl", "Less-Forgetful Learning: keep the backbone's features (lambda_e)", _simple(LFL),
                 LFLOptions, state=LFL_STATE, check=_lfl_check, avalanche="LFL"),
    StrategySpec("gdumb", "GDumb: retrain from the initial model on a class-balanced memory (mem_size)",
                 _simple(GDumb, memory=True), ReplayOptions, uses_memory=True, state=GDUMB_STATE,
                 avalanche="GDumb",
                 tiny_options={"mem_size": 8}),
    StrategySpec("mer", "Meta-Experience Replay (mem_size, batch_size_mem, n_inner_steps, beta, gamma)",
                 _simple(MER, memory=True), MEROptions, uses_memory=True, state=MER_STATE, avalanche="MER",
                 tiny_options={"mem_size": 8, "batch_size_mem": 2, "n_inner_steps": 1}),
):  # fmt: skip
    STRATEGIES.register(spec.name, spec.description)(spec)
