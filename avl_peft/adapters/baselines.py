"""Baselines that are methods too: ``full`` fine-tuning and ``head`` (linear probe).

They add no adapter: ``full`` lets every backbone weight train, ``head`` freezes the whole backbone so
only the classifier learns. The classifier head trains in every method.
"""

from __future__ import annotations

from .base import METHODS


class Baseline:
    trains_backbone: bool = False


@METHODS.register("full", "full fine-tuning: every backbone weight trains")
class Full(Baseline):
    trains_backbone = True


@METHODS.register("head", "linear probe: frozen backbone, only the classifier trains")
class Head(Baseline):
    trains_backbone = False
