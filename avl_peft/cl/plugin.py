"""The Avalanche side of a method: :class:`PEFTPlugin` manages an adapter's lifecycle across experiences.

It composes with any Avalanche strategy (Naive, Replay, EWC, LwF, …): the strategy decides *how* to
learn, the plugin decides *which* parameters can change.

Lifecycle (docs/design.md):
- ``before_training_exp`` of the first adapted experience: inject the adapters, then rebuild the
  optimizer — Avalanche only syncs parameters into the optimizer in ``make_optimizer``, which it has
  already called for this experience, so new adapter parameters would otherwise never train.
- ``policy="continue"``: one adapter set trains through every experience.
- ``policy="merge"``: after each experience ΔW is folded into W and a fresh adapter is injected for the
  next one (PiSSA re-derives its factors from the merged weights).
- ``pretrain=True``: the first experience is a base session trained with full fine-tuning; the method
  applies from the second experience on (the "B-N" protocol).

Checkpoints (``checkpoint_dir``): ``exp_<t>.pt`` after each experience (:mod:`.checkpoints`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from ..adapters import METHODS
from ..adapters.inject import inject, merge
from ..errors import ConfigError
from .checkpoints import save_checkpoint

POLICIES = ("continue", "merge")


def reset_optimizer(strategy: Any) -> None:
    """Put the model's current parameters in the strategy's optimizer, with fresh optimizer state.

    Parameters that left the model (a merged adapter) are dropped from the optimizer too, so it never
    keeps stepping tensors that no longer exist in the model.
    """
    strategy.optimized_param_id = None  # forces Avalanche to re-gather (name, param) from the model
    strategy.make_optimizer(reset_optimizer_state=True, remove_params=True)


class PEFTPlugin(SupervisedPlugin, supports_distributed=True):
    """Inject ``method``'s adapters into ``strategy.model`` and manage them across experiences.

    :param method: a name from ``avl_peft.methods()`` (adapters and the ``full``/``head`` baselines).
    :param policy: ``continue`` or ``merge`` (see module docstring).
    :param pretrain: train the first experience with full fine-tuning (base session).
    :param targets: module-name suffixes or regexes (default: every linear layer in the blocks).
    :param checkpoint_dir: if set, ``exp_<t>.pt`` with the adapter and head state after each experience.
    :param options: the method's options (``rank``, ``alpha``, …).
    """

    def __init__(
        self,
        method: str,
        *,
        policy: str = "continue",
        pretrain: bool = False,
        targets: list[str] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        **options: Any,
    ):
        super().__init__()
        METHODS.get(method)  # fail now, not at the first experience
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.method, self.policy, self.pretrain = method, policy, bool(pretrain)
        self.targets, self.options = targets, options
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.experiences_done = 0  # counts this plugin's experiences, independent of eval calls

    def _inject(self, model: torch.nn.Module) -> None:
        inject(model, self.method, targets=self.targets, **self.options)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model, t = strategy.model, self.experiences_done
        config = getattr(model, "peft_config", None)
        if self.pretrain and t == 0:
            inject(model, "full")  # base session: the whole backbone learns the first experience
        elif self.pretrain and t == 1 or config is None:
            if config is not None:  # end of the base session: drop the "full" marker, freeze again
                model.peft_config = None
            self._inject(model)
        else:
            return  # policy "continue": the same adapter keeps training, optimizer state included
        model.to(strategy.device)
        reset_optimizer(strategy)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = strategy.model
        if self.checkpoint_dir is not None:
            t = self.experiences_done
            save_checkpoint(model, self.checkpoint_dir / f"exp_{t}.pt", t, method=self.method, policy=self.policy)
        in_base_session = self.pretrain and self.experiences_done == 0
        if self.policy == "merge" and not in_base_session:
            merge(model)  # next before_training_exp injects a fresh adapter on the folded weights
        self.experiences_done += 1
