"""Baselines that are methods too: ``full`` fine-tuning and ``head`` (linear probe).

They add no adapter: ``full`` lets every backbone weight train, ``head`` freezes the whole backbone so
only the classifier learns. The classifier head trains in every method.
"""

from __future__ import annotations

import dataclasses

from .base import METHODS


@dataclasses.dataclass
class NoOptions:
    """Baselines take no options."""


class Baseline:
    """Registry entry of a method without adapters; the capabilities mirror :class:`~.base.Adapter`'s."""

    Options = NoOptions
    adds_adapter = False
    trains_backbone = False
    budget_knobs: tuple[str, ...] = ()
    requires_stack = False

    @classmethod
    def capabilities(cls) -> list[str]:
        return ["trains the backbone"] if cls.trains_backbone else ["frozen backbone"]


@METHODS.register("full", "full fine-tuning: every backbone weight trains")
class Full(Baseline):
    trains_backbone = True


@METHODS.register("head", "linear probe: frozen backbone, only the classifier trains")
class Head(Baseline):
    trains_backbone = False
