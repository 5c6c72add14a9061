"""Per-experience checkpoints ``exp_<t>.pt``: what distinguishes a model from its frozen backbone.

Written by ``torch.save`` and readable with ``torch.load(..., weights_only=True)`` (Avalanche's own
``save_checkpoint`` pickles the whole strategy with dill and breaks with current torch). Each holds the
adapter tensors, trainable weights and the classifier head (parameters *and* buffers, so the head's
active-class mask comes back), plus ``injected``: which method was injected, with its targets and options.
:func:`restore_checkpoint` loads one into a fresh model. Under ``policy="merge"`` (and after a ``pretrain``
base session) the backbone itself changed: restore the checkpoints in order, merging in between
(``restore_checkpoint(m, exp_0); merge(m); restore_checkpoint(m, exp_1)``, …); the base session's
``exp_0.pt`` holds the whole model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import IncrementalClassifier
from avalanche.models.utils import avalanche_model_adaptation

from .. import atomic
from ..adapters.inject import head_names, injection, lineage, reinject, trainable_state_dict, trains_backbone_marker
from ..adapters.stack import adapted_layers, adapter_state_dict, load_adapter_state, resize_buffer
from ..errors import ConfigError, key_summary


def checkpoint_state(model: torch.nn.Module, experience: int, **meta: Any) -> dict[str, Any]:
    """What ``exp_<t>.pt`` holds: the model's trainable/adapter tensors plus the head's buffers, and metadata.

    ``injected`` records the adapter actually in the model (``full`` during a base session), with its
    targets and options, so :func:`restore_checkpoint` can rebuild the same structure.
    """
    state = trainable_state_dict(model)
    state.update(adapter_state_dict(model))  # frozen branches and GPM bases (policy: stack) too
    full = model.state_dict()
    for head in head_names(model):  # e.g. IncrementalClassifier.active_units: which classes are unmasked
        state.update({k: v.detach().clone() for k, v in full.items() if k.startswith(head + ".")})
    return {
        "experience": int(experience),
        **meta,
        "injected": injection(model),
        "lineage": lineage(model),
        "model": state,
    }


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, experience: int, **meta: Any) -> Path:
    """Write :func:`checkpoint_state` to ``path`` atomically; return the path."""
    path = Path(path)
    atomic.save_torch(checkpoint_state(model, experience, **meta), path)
    return path


def _resize_incremental_heads(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Grow every Avalanche IncrementalClassifier to the size stored in ``state`` (a fresh one has 2 units)."""
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


def _check_lineage(model: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """The checkpoint must have been trained on the backbone ``model`` holds (same merges and base session)."""
    wanted = checkpoint.get("lineage")
    if wanted is None:  # written before lineages were recorded
        return
    have = lineage(model)
    injected = checkpoint.get("injected") or {}
    if trains_backbone_marker(model) and injected.get("method") != model.avl_peft_injection["method"]:
        have += 1  # restoring the next step ends the restored base session (see reinject)
    if have != wanted:
        t = checkpoint.get("experience", "?")
        raise ConfigError(
            f"checkpoint of experience {t} was trained on a backbone with {wanted} earlier change(s) (merged adapters "
            f"or a base session) but this model has {have}: restore the checkpoints in order, merging in between "
            "under policy merge (PEFTPlugin.restore does it for a whole directory)"
        )


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
    state = checkpoint["model"]
    _check_lineage(model, checkpoint)
    reinject(model, checkpoint.get("injected"))
    _resize_incremental_heads(model, state)
    if adapted_layers(model):
        load_adapter_state(model, state)  # stacks to the saved branch count, sizes GPM bases, then loads
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if unexpected or mismatched:
        detail = key_summary([("unexpected", unexpected), ("shape mismatch", mismatched)])
        raise ConfigError(f"checkpoint does not fit this model ({detail})")
    model.load_state_dict(state, strict=False)
    return model


def _adopt_buffer_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every buffer the shape ``state`` holds for it (masks of heads that grew: active_units…)."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in modules:
            resize_buffer(modules[owner], leaf, value.shape)


def rebuild_model(
    model: torch.nn.Module,
    injected: dict[str, Any] | None,
    state: dict[str, torch.Tensor],
    *,
    lineage: int = 0,
    experiences: Any = (),
    strict: bool = True,
) -> torch.nn.Module:
    """Give a fresh ``model`` the structure of a saved one and load its full ``state``.

    Heads are grown by eval-mode adaptation to ``experiences`` (a multi-head model gets its task heads;
    no class is marked trained), the saved injection is rebuilt (:func:`reinject`: adapters, stacked
    branches, GPM bases), class-incremental heads and buffers take the saved shapes. ``strict``: every
    tensor of the model must be in ``state``; otherwise only tensors of modules the saved model did not
    have yet (heads of later tasks) may be missing. Shape mismatches and unknown keys are ConfigErrors.
    """
    was_training = model.training
    model.eval()  # eval-mode adaptation grows heads without marking classes as trained
    for experience in experiences:
        avalanche_model_adaptation(model, experience)
    model.train(was_training)
    _resize_incremental_heads(model, state)  # before reinject, which loads (and shape-checks) the state
    _adopt_buffer_shapes(model, state)
    reinject(model, injected, state)
    model.avl_peft_lineage = int(lineage)
    if strict:
        model.load_state_dict(state)
        return model
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if unexpected or mismatched:
        raise ConfigError(f"saved model does not fit (unexpected: {unexpected[:4]}, shape mismatch: {mismatched[:4]})")
    model.load_state_dict(state, strict=False)
    return model


class CheckpointPlugin(SupervisedPlugin, supports_distributed=True):
    """``exp_<t>.pt`` after each training experience, for strategies that run without :class:`PEFTPlugin`."""

    def __init__(self, checkpoint_dir: str | os.PathLike, **meta: Any):
        super().__init__()
        self.checkpoint_dir, self.meta = Path(checkpoint_dir), meta

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        # The strategy's clock (the last plugin, so not yet advanced) numbers the experience: a resumed run,
        # whose clock is restored, continues the numbering instead of overwriting exp_0.pt.
        t = int(strategy.clock.train_exp_counter)
        path = self.checkpoint_dir / f"exp_{t}.pt"
        if path.exists():
            raise ConfigError(f"'{path}' exists; checkpoints are never overwritten")
        save_checkpoint(strategy.model, path, t, **self.meta)


_CHECKPOINT = re.compile(r"exp_(\d+)\.pt")


def checkpoint_files(directory: Path) -> dict[int, Path]:
    """``exp_<t>.pt`` files in ``directory`` by experience index."""
    if not directory.is_dir():
        return {}
    found = {}
    for path in directory.iterdir():
        m = _CHECKPOINT.fullmatch(path.name)
        if m:
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))
