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
- ``policy="stack"``: after each experience the adapter is frozen and kept as a branch, and a fresh one
  trains on the next (:mod:`avl_peft.adapters.stack`); required by ``inflora``/``sdlora`` and by
  ``interference: orthogonal | project``, which need the earlier branches / input subspaces.
- ``pretrain=True``: the first experience is a base session trained with full fine-tuning; the method
  applies from the second experience on (the "B-N" protocol).
- Interference control: before an experience trains, the layers' inputs on its data are collected where
  the method needs them (InfLoRA designs A; ``project`` confines the branch away from the kept subspace);
  ``orthogonal`` adds O-LoRA's penalty to the loss; after training, the kept input subspace grows.

Checkpoints (``checkpoint_dir``): ``exp_<t>.pt`` after each experience (:mod:`.checkpoints`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader

from ..adapters import METHODS, begin_experience, collect_inputs, end_experience, interference_penalty, needs_inputs
from ..adapters.base import parse_options
from ..adapters.inject import inject, merge
from ..adapters.stack import stack
from ..errors import ConfigError
from .checkpoints import save_checkpoint

POLICIES = ("continue", "merge", "stack")
INPUT_SAMPLES = 1024  # layer-input rows kept per layer and experience for the subspace bookkeeping


def reset_optimizer(strategy: Any) -> None:
    """Put the model's current parameters in the strategy's optimizer, with fresh optimizer state.

    Parameters that left the model (a merged adapter) are dropped from the optimizer too, so it never
    keeps stepping tensors that no longer exist in the model.
    """
    strategy.optimized_param_id = None  # forces Avalanche to re-gather (name, param) from the model
    strategy.make_optimizer(reset_optimizer_state=True, remove_params=True)


def check_policy(method: str, policy: str, options: dict[str, Any]) -> None:
    """A method/options/policy combination that cannot work is refused here, before anything trains."""
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    cls = METHODS.get(method)
    if cls.requires_stack and policy != "stack":
        raise ConfigError(f"method '{method}' keeps one branch per experience: it needs policy: stack, got {policy}")
    interference = options.get("interference", "none")
    if interference != "none" and policy != "stack":
        raise ConfigError(
            f"interference: {interference} keeps the update away from earlier experiences' branches/inputs, "
            f"which only policy: stack keeps; got policy: {policy}"
        )


class PEFTPlugin(SupervisedPlugin, supports_distributed=True):
    """Inject ``method``'s adapters into ``strategy.model`` and manage them across experiences.

    :param method: a name from ``avl_peft.methods()`` (adapters and the ``full``/``head`` baselines).
    :param policy: ``continue``, ``merge`` or ``stack`` (see module docstring).
    :param pretrain: train the first experience with full fine-tuning (base session).
    :param targets: module-name suffixes or regexes (default: every linear layer in the blocks).
    :param checkpoint_dir: if set, ``exp_<t>.pt`` with the adapter and head state after each experience.
    :param options: the method's options (``rank``, ``alpha``, ``interference``, ``lambda``, …), validated
        here; whether targets and rank fit the model is checked when the plugin first sees it.
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
        cls = METHODS.get(method)  # fail now, not at the first experience
        if cls.adds_adapter:
            parse_options(cls.Options, method, options)
        elif options or targets is not None:
            given = sorted(options) + (["targets"] if targets is not None else [])
            raise ConfigError(f"method '{method}' takes no options, got {', '.join(given)}")
        check_policy(method, policy, options)
        if targets is not None and (not targets or not all(isinstance(t, str) and t for t in targets)):
            raise ConfigError(f"targets must be a non-empty list of module-name suffixes or regexes, got {targets!r}")
        self.method, self.policy, self.pretrain = method, policy, bool(pretrain)
        self.targets, self.options = targets, options
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.experiences_done = 0  # counts this plugin's experiences, independent of eval calls

    def _inject(self, model: torch.nn.Module) -> None:
        inject(model, self.method, targets=self.targets, **self.options)

    def _inputs(self, strategy: Any) -> dict[str, torch.Tensor] | None:
        """The adapted layers' inputs on this experience's training data (only where the method needs them)."""
        if not needs_inputs(strategy.model):
            return None
        dataset = strategy.experience.dataset
        dataset = dataset.eval() if hasattr(dataset, "eval") else dataset  # no augmentation
        # Own generator: a DataLoader iterator otherwise draws its base seed from torch's global RNG,
        # which would shift the training's random stream.
        loader = DataLoader(
            dataset, batch_size=strategy.eval_mb_size, shuffle=False, generator=torch.Generator().manual_seed(0)
        )
        return collect_inputs(strategy.model, loader, max_samples=INPUT_SAMPLES)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model, t = strategy.model, self.experiences_done
        config = getattr(model, "avl_peft_injection", None)
        if self.pretrain and t == 0:
            inject(model, "full")  # base session: the whole backbone learns the first experience
        elif self.pretrain and t == 1 or config is None:
            if config is not None:  # end of the base session: drop the "full" marker, freeze again
                model.avl_peft_injection = None
            self._inject(model)
            begin_experience(model, self._inputs(strategy))
        elif self.policy == "stack":
            stack(model)  # freeze the last experience's branch, start a fresh one
            begin_experience(model, self._inputs(strategy))
        else:
            return  # policy "continue": the same adapter keeps training, optimizer state included
        model.to(strategy.device)
        reset_optimizer(strategy)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.options.get("interference") == "orthogonal":
            strategy.loss = strategy.loss + interference_penalty(strategy.model)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = strategy.model
        in_base_session = self.pretrain and self.experiences_done == 0
        if not in_base_session and needs_inputs(model):
            end_experience(model, self._inputs(strategy))  # grow the kept input subspace with this experience
        if self.checkpoint_dir is not None:
            t = self.experiences_done
            save_checkpoint(model, self.checkpoint_dir / f"exp_{t}.pt", t, method=self.method, policy=self.policy)
        if self.policy == "merge" and not in_base_session:
            merge(model)  # next before_training_exp injects a fresh adapter on the folded weights
        self.experiences_done += 1
