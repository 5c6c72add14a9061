"""The continual model: a frozen timm backbone (:mod:`avl_peft.backbones`) plus an Avalanche head."""

from __future__ import annotations

import os
from typing import Any

import torch
from avalanche.models import BaseModel, IncrementalClassifier, MultiHeadClassifier, MultiTaskModule
from torch import nn

# The timm-only helpers live below the Avalanche layer; re-exported here for scripts that import them from here.
from ..backbones import (  # noqa: F401
    BACKBONE_KWARG_LIMITS,
    check_backbone_kwargs,
    closest_models,
    create_backbone,
    data_config,
    load_checkpoint,
    meta_backbone,
    read_state_dict,
)
from ..errors import ConfigError


class ContinualViT(nn.Module, BaseModel):
    """A feature backbone (timm model with ``num_classes=0``) plus a class-incremental head.

    The head is Avalanche's ``IncrementalClassifier``: it grows with the classes seen and masks the
    logits of classes not trained yet, so argmax runs over every class seen so far.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def get_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features (Avalanche's BaseModel interface, which LFL's feature distillation uses)."""
        return self.backbone(x)


def _multi_head_class():
    class MultiHeadViT(MultiTaskModule):
        """Task-incremental variant: one head per task (Avalanche ``MultiHeadClassifier``)."""

        def __init__(self, backbone: nn.Module, head: nn.Module):
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
            # float32: MultiTaskModule.forward writes each task's logits into a float32 buffer, which an
            # autocast (bf16/fp16) output cannot be index-put into
            return self.head(self.backbone(x), task_label).float()

    return MultiHeadViT


HEADS = ("incremental", "multi")


def create_continual_model(
    name: str,
    *,
    head: str = "incremental",
    initial_classes: int = 2,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm backbone with an Avalanche incremental (``incremental``) or multi-task (``multi``) head."""
    if head not in HEADS:
        raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    backbone = create_backbone(name, pretrained=pretrained, checkpoint=checkpoint, num_classes=1, **timm_kwargs)
    backbone.reset_classifier(0)  # features only; the continual head lives outside the backbone
    dim = backbone.num_features
    if head == "incremental":
        return ContinualViT(backbone, IncrementalClassifier(dim, initial_out_features=initial_classes))
    return _multi_head_class()(backbone, MultiHeadClassifier(dim, initial_out_features=initial_classes))
