"""The adapter contract and the one wrapper around ``nn.Linear`` that every method shares.

A target layer computes ``y = W x + b`` with ``W`` of shape (d_out, d_in). An adapter defines a dense
update ``ΔW`` (:meth:`Adapter.delta_weight`, the specification) and a forward pass that must equal
``F.linear(x, W + ΔW, b)`` but may be computed faster without materialising ``ΔW``
(:meth:`Adapter.forward`, an optimisation tied to the dense path by the tests).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import Registry, suggest

METHODS: Registry[type] = Registry("method")


@dataclasses.dataclass
class AdapterOptions:
    """Options every low-rank method accepts. Subclasses add their own fields."""

    rank: int = 8  # r: the size of the update subspace; 8 is the study's mid-range default
    alpha: float | None = None  # LoRA scale s = alpha / r; None means alpha = r (s = 1), the study's choice
    dropout: float = 0.0  # dropout on the adapter path's input; 0 keeps runs deterministic and fast

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and (not isinstance(self.alpha, (int, float)) or self.alpha <= 0):
            raise ConfigError(f"alpha must be a positive number (or null for alpha = rank), got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def parse_options(cls: type[AdapterOptions], method: str, options: dict[str, Any]) -> AdapterOptions:
    """Build a method's options dataclass, turning unknown keys into an actionable ConfigError."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"method '{method}' has no option '{key}'. Allowed: {', '.join(allowed) or '(none)'}."
                f"{suggest(key, allowed)}"
            )
    return cls(**options)


class Adapter(nn.Module):
    """Base class of a low-rank update attached to one ``nn.Linear``.

    Subclasses set ``Options`` and implement ``delta_weight(weight)``; they override ``forward`` with a
    factored pass when one exists. ``weight`` is always passed in (never stored), so an adapter never
    holds a second reference to the frozen backbone.
    """

    Options: ClassVar[type[AdapterOptions]] = AdapterOptions
    # Adapters of one type that share parameters across layers (WeGeFT) fill this per injection.
    shared: ClassVar[bool] = False

    def __init__(self, layer: nn.Linear, opts: AdapterOptions, shared: nn.Module | None = None):
        super().__init__()
        self.opts = opts
        self.scale = opts.scale
        self.drop = nn.Dropout(opts.dropout) if opts.dropout > 0 else nn.Identity()

    @staticmethod
    def max_rank(d_out: int, d_in: int) -> int:
        return min(d_out, d_in)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:  # (d_out, d_in)
        raise NotImplementedError

    def forward(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        # Dense reference path; subclasses override with a factored equivalent.
        return F.linear(x, layer.weight + self.delta_weight(layer.weight), layer.bias)


class AdaptedLinear(nn.Module):
    """An ``nn.Linear`` plus one adapter: ``y = (W + ΔW) x + b``. The only wrapper in avl-peft."""

    def __init__(self, base: nn.Linear, adapter: Adapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def weight(self) -> torch.Tensor:  # timm code sometimes reads .weight (e.g. dtype checks)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        return self.adapter.delta_weight(self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x, self.base)

    def merged(self) -> nn.Linear:
        """The base layer with ΔW folded into its weight (one-way)."""
        with torch.no_grad():
            self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        return self.base


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (kaiming-uniform, a=sqrt(5)) as LoRA uses for A."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))
