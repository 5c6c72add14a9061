"""Continual-learning strategies by name: Avalanche's own with the adapter plugin composed in, and L2P.

Each registry entry is a :class:`~.base.StrategySpec` carrying its builder, options and capabilities.
"""

from . import builtin, l2p  # noqa: F401  (registration side effects)
from .base import STRATEGIES, StrategySpec, strategy_options

__all__ = ["STRATEGIES", "StrategySpec", "strategy_options"]
