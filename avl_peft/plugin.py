"""The Avalanche side of a method: :class:`PEFTPlugin` manages an adapter's lifecycle across experiences.

It composes with any Avalanche strategy (Naive, Replay, EWC, LwF, …): the strategy decides *how* to
learn, the plugin decides *which* parameters can change.

Lifecycle (SPEC §3):
- ``before_training_exp`` of the first adapted experience: inject the adapters, then rebuild the
  optimizer — Avalanche only syncs parameters into the optimizer in ``make_optimizer``, which it has
  already called for this experience, so new adapter parameters would otherwise never train.
- ``policy="continue"``: one adapter set trains through every experience.
- ``policy="merge"``: after each experience ΔW is folded into W and a fresh adapter is injected for the
  next one (PiSSA re-derives its factors from the merged weights).
- ``pretrain=True``: the first experience is a base session trained with full fine-tuning; the method
  applies from the second experience on (the "B-N" protocol).

Checkpoints (``checkpoint_dir``): ``exp_<t>.pt`` after each experience, written by ``torch.save`` and readable
with ``torch.load(..., weights_only=True)`` (Avalanche's own ``save_checkpoint`` pickles the whole strategy
with dill and breaks with current torch). Each holds what distinguishes the model from its frozen backbone at
that point: adapter tensors, trainable weights and the classifier head (parameters *and* buffers, so the
head's active-class mask comes back). :func:`restore_checkpoint` loads one into a fresh model. Under
``policy="merge"`` (and after a ``pretrain`` base session) the backbone itself changed: restore the
checkpoints in order, merging in between (``restore_checkpoint(m, exp_0); merge(m); restore_checkpoint(m,
exp_1)``, …); the base session's ``exp_0.pt`` holds the whole model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from . import atomic
from .adapters import METHODS
from .errors import ConfigError
from .peft import head_names, inject, merge, trainable_state_dict

POLICIES = ("continue", "merge")


def reset_optimizer(strategy: Any) -> None:
    """Put the model's current parameters in the strategy's optimizer, with fresh optimizer state.

    Parameters that left the model (a merged adapter) are dropped from the optimizer too, so it never
    keeps stepping tensors that no longer exist in the model.
    """
    strategy.optimized_param_id = None  # forces Avalanche to re-gather (name, param) from the model
    strategy.make_optimizer(reset_optimizer_state=True, remove_params=True)


def _adapter_methods() -> set[str]:
    from .adapters.baselines import Baseline

    return {m for m in METHODS.names() if not issubclass(METHODS.get(m), Baseline)}


def checkpoint_state(model: torch.nn.Module, experience: int, **meta: Any) -> dict[str, Any]:
    """What ``exp_<t>.pt`` holds: the model's trainable/adapter tensors plus the head's buffers, and metadata.

    ``injected`` records the adapter actually in the model (``full`` during a base session), with its
    targets and options, so :func:`restore_checkpoint` can rebuild the same structure.
    """
    state = trainable_state_dict(model)
    full = model.state_dict()
    for head in head_names(model):  # e.g. IncrementalClassifier.active_units: which classes are unmasked
        state.update({k: v.detach().clone() for k, v in full.items() if k.startswith(head + ".")})
    config = getattr(model, "peft_config", None)
    injected = None
    if config is not None:
        injected = {
            "method": config["method"],
            "targets": list(config["targets"]) if config["method"] in _adapter_methods() else None,
            "options": dict(config["options"]),
        }
    return {"experience": int(experience), **meta, "injected": injected, "model": state}


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, experience: int, **meta: Any) -> Path:
    """Write :func:`checkpoint_state` to ``path`` atomically; return the path."""
    path = Path(path)
    atomic.save_torch(checkpoint_state(model, experience, **meta), path)
    return path


def _resize_incremental_heads(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Grow every Avalanche IncrementalClassifier to the size stored in ``state`` (a fresh one has 2 units)."""
    from avalanche.models import IncrementalClassifier

    for name, module in model.named_modules():
        if not isinstance(module, IncrementalClassifier):
            continue
        prefix = f"{name}." if name else ""
        weight = state.get(f"{prefix}classifier.weight")
        if weight is None or weight.shape == module.classifier.weight.shape:
            continue
        device = module.classifier.weight.device
        n_out, n_in = weight.shape
        module.classifier = torch.nn.Linear(n_in, n_out).to(device)
        if f"{prefix}active_units" in state:
            module.active_units = torch.zeros(n_out, dtype=torch.int8, device=device)


def restore_checkpoint(model: torch.nn.Module, checkpoint: str | os.PathLike | dict[str, Any]) -> torch.nn.Module:
    """Load an ``exp_<t>.pt`` (path or loaded dict) into ``model``, injecting its adapter first if needed.

    ``model`` is a fresh model built like the trained one (same backbone, same seed or checkpoint). Class-
    incremental heads are grown to the stored size; a multi-head model must first be adapted to the
    experiences (``avalanche_model_adaptation``). Every stored tensor must find its place, or ConfigError.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "model" not in checkpoint:
        raise ConfigError("not an avl-peft checkpoint: it has no 'model' entry")
    state, injected = checkpoint["model"], checkpoint.get("injected")
    config = getattr(model, "peft_config", None)
    if injected is not None and (config is None or config["method"] != injected["method"]):
        if config is not None and config["method"] in _adapter_methods():
            raise ConfigError(
                f"model has '{config['method']}' injected but the checkpoint holds '{injected['method']}'; "
                "merge(model) or start from a fresh model"
            )
        model.peft_config = None  # a baseline marker (full/head) only sets requires_grad; replace it
        if injected["method"] in _adapter_methods():
            inject(model, injected["method"], targets=injected["targets"], **injected["options"])
        else:
            inject(model, injected["method"])
    _resize_incremental_heads(model, state)
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if unexpected or mismatched:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
            for label, keys in (("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        )
        raise ConfigError(f"checkpoint does not fit this model ({detail})")
    model.load_state_dict(state, strict=False)
    return model


class CheckpointPlugin(SupervisedPlugin, supports_distributed=True):
    """``exp_<t>.pt`` after each training experience, for strategies that run without :class:`PEFTPlugin`."""

    def __init__(self, checkpoint_dir: str | os.PathLike, **meta: Any):
        super().__init__()
        self.checkpoint_dir, self.meta, self.experiences_done = Path(checkpoint_dir), meta, 0

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        t = self.experiences_done
        save_checkpoint(strategy.model, self.checkpoint_dir / f"exp_{t}.pt", t, **self.meta)
        self.experiences_done += 1


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
