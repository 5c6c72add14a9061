"""The strategy registry: each entry is a :class:`StrategySpec` — how to build it and what it needs.

Everything the rest of the package needs to know about a strategy is a field here, so no code outside
this package checks strategy names: the schema calls ``spec.check`` and reads ``uses_memory``; the run
reads ``owns_model``/``trains_weights``; resume saves and restores ``spec.state`` (:mod:`.state`) and reads
``resumable``; ``avl-peft list`` prints all of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ...options import as_dict, parse_options
from ...registry import Registry
from .state import StateContext, StatePart, capture, restore


@dataclasses.dataclass(frozen=True)
class StrategySpec:
    """A registered strategy.

    :param build: ``build(model, optimizer, criterion, *, plugins, **template_kwargs, **options)`` → an
        Avalanche template.
    :param options: the options dataclass (values checked in its ``__post_init__``).
    :param uses_memory: replays stored samples of earlier classes, so the loss must see them
        (``training.train_mask: seen``).
    :param state: where the strategy keeps what it learned across experiences (buffers, importances,
        previous models…): saved with the run state and restored on resume (:mod:`.state`).
    :param resumable: a run interrupted mid-way continues exactly from its last finished experience
        (everything in ``state`` plus model, optimizer, clock and RNGs is saved); otherwise it restarts
        from experience 0 and says so, with ``resume_note`` saying why.
    :param owns_model: builds its own model from the run's backbone (the run's model is not trained).
    :param trains_weights: updates backbone weights (or adapters); False for prompt-only strategies, whose
        weight geometry is not measured.
    :param check: extra checks of a whole run config, raising ConfigError.
    :param features: ``(strategy, images) -> features`` for statistics heads when the strategy's model has no
        ``backbone`` module (L2P's prompted ViT); None: ``strategy.model.backbone``.
    :param avalanche: the class in ``avalanche.training`` this entry builds (None for a plugin on Naive),
        for the compatibility table (``benchmarks/compat``).
    :param tiny_options: options that size the strategy's memory and inner steps for a tiny run (16 images per
        experience): what the compatibility table and the resume tests run it with.
    """

    name: str
    description: str
    build: Callable[..., Any]
    options: type
    uses_memory: bool = False
    resumable: bool = True
    owns_model: bool = False
    trains_weights: bool = True
    check: Callable[[dict], None] | None = None
    features: Callable[[Any, Any], Any] | None = None
    state: tuple[StatePart, ...] = ()
    resume_note: str = ""
    avalanche: str | None = None
    tiny_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def parse(self, options: Any) -> dict[str, Any]:
        """The options merged over their defaults, validated, as a plain mapping."""
        return as_dict(parse_options(self.options, f"strategy '{self.name}'", options))

    def capabilities(self) -> list[str]:
        flags = {
            "memory": self.uses_memory,
            "exact resume": self.resumable,
            "restarts on resume": not self.resumable,
            "own model": self.owns_model,
        }
        return [k for k, v in flags.items() if v]

    def state_dict(self, strategy: Any) -> list[dict[str, Any]]:
        """The strategy's own state as plain data (``weights_only``-loadable)."""
        return capture(self.state, strategy)

    def load_state_dict(self, strategy: Any, state: list[dict[str, Any]], ctx: StateContext) -> None:
        """Put a saved :meth:`state_dict` back into a freshly built strategy of this kind."""
        restore(self.state, strategy, state, ctx)


STRATEGIES: Registry[StrategySpec] = Registry("strategy")


def strategy_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Merge user options over the strategy's defaults, rejecting unknown names and bad values."""
    return STRATEGIES.get(name).parse(options)
