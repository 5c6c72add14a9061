"""What :class:`~avl_peft.cl.plugin.PEFTPlugin` must know about the strategy and plugins it joins.

Checked at the plugin's first ``before_training``, before anything trains (Avalanche gives a plugin no
earlier look at its strategy):

- Strategies that build and train their own model architecture — progressive networks (PNN), PackNet's
  pruned masks, Expert Gate's experts, the (variational) auto-encoder trainers, AR1's MobileNet — cannot
  have adapters injected: ConfigError.
- Avalanche's ``BiCPlugin`` passes ``verbose`` to torch's ``MultiStepLR``, which current torch no longer
  accepts; :class:`TorchBiCPlugin` drops that argument (nothing else changes) and a plain ``BiCPlugin``
  is switched to it, with a warning.
- Avalanche's ``MIRPlugin`` differentiates *every* model parameter (``torch.autograd.grad`` over
  ``model.parameters()``), which raises on a frozen backbone. :class:`TrainableMIRPlugin` is the same
  algorithm over the trainable parameters only; a plain ``MIRPlugin`` (as Avalanche's ``MIR`` strategy
  builds it) is switched to it, with a warning.
- ``RWalkPlugin`` records every parameter by name in its ``before_training``: it must come after
  PEFTPlugin in ``plugins`` (PEFTPlugin injects in its own ``before_training``), or ConfigError.
- Path-integral importances (SI, RWalk) follow one set of parameters along its trajectory. A merge, a new
  branch (``stack``) or the end of a base session replaces those parameters between experiences, so the
  importance would be computed from a displacement the training never made: ConfigError unless
  ``policy="continue"`` without ``pretrain``. EWC and MAS measure importance at the end point and work
  under every policy.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import torch
from avalanche.benchmarks.utils import concat_datasets
from avalanche.models.utils import avalanche_forward
from avalanche.training import AR1, AETraining, ExpertGateStrategy, PackNet, PNNStrategy, VAETraining
from avalanche.training.plugins import BiCPlugin, MIRPlugin, RWalkPlugin, SynapticIntelligencePlugin
from avalanche.training.plugins.mir import cycle

from ..errors import ConfigError

# Strategies whose model is theirs to build and grow; an adapter cannot be injected into it.
OWN_MODEL = (PNNStrategy, PackNet, ExpertGateStrategy, AETraining, VAETraining, AR1)
# Plugins that snapshot every parameter by name in before_training: they must see the injected model.
SNAPSHOT_IN_BEFORE_TRAINING = (RWalkPlugin,)
# Plugins whose importance integrates over the trained parameters' path within and across experiences.
PATH_INTEGRAL = (SynapticIntelligencePlugin, RWalkPlugin)


def _update_temp(model: torch.nn.Module, grads: dict[str, torch.Tensor], lr: float) -> torch.nn.Module:
    """A copy of ``model`` after one SGD step on the given (name -> gradient) pairs (MIR's virtual update)."""
    import copy

    updated = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in updated.named_parameters():
            g = grads.get(name)
            if g is not None:
                p.sub_(lr * g)
    return updated


class TrainableMIRPlugin(MIRPlugin):
    """Avalanche's MIR (Aljundi et al., 2019) with its virtual SGD step over the trainable parameters only.

    MIR picks, from a random memory subsample, the stored samples whose loss would rise most after one SGD
    step on the current batch, and replays those. Frozen parameters never move in that step, so leaving
    them out changes nothing but lets the gradient be taken at all. The memory MIR samples from after an
    experience is kept as ``replay_buffer`` (so a resumed run can rebuild the same loader: :meth:`rebuild`).
    """

    replay_buffer: Any = None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.storage_policy.update(strategy, **kwargs)
        last = set(torch.unique(strategy.mb_y).cpu().tolist())  # classes of the last batch are left out
        groups = [g.buffer for key, g in self.storage_policy.buffer_groups.items() if int(key) not in last]
        self.replay_buffer = concat_datasets(groups) if groups else None
        self.rebuild()

    def rebuild(self) -> None:
        """The cycling loader over ``replay_buffer``, as MIR makes it (no random draw until it is iterated)."""
        buffer = self.replay_buffer
        if buffer is not None and len(buffer) > self.batch_size_mem:
            self.replay_loader = cycle(torch.utils.data.DataLoader(buffer, batch_size=self.subsample, shuffle=True))
        else:
            self.replay_loader = None

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.replay_loader is None:
            return
        samples_x, samples_y, samples_tid = (t.to(strategy.device) for t in next(self.replay_loader))
        named = [(n, p) for n, p in strategy.model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(strategy.loss, [p for _, p in named], retain_graph=True, allow_unused=True)
        updated = _update_temp(
            strategy.model, {n: g for (n, _), g in zip(named, grads)}, strategy.optimizer.param_groups[0]["lr"]
        )
        with torch.no_grad():
            reduction = strategy._criterion.reduction
            strategy._criterion.reduction = "none"
            old_loss = strategy._criterion(avalanche_forward(strategy.model, samples_x, samples_tid), samples_y)
            new_loss = strategy._criterion(avalanche_forward(updated, samples_x, samples_tid), samples_y)
            strategy._criterion.reduction = reduction
            chosen = torch.argsort(new_loss - old_loss)[len(samples_x) - self.batch_size_mem :]
        out = avalanche_forward(strategy.model, samples_x[chosen], samples_tid[chosen])
        strategy.loss += strategy._criterion(out, samples_y[chosen])


def _multisteplr_takes_verbose() -> bool:
    return "verbose" in inspect.signature(torch.optim.lr_scheduler.MultiStepLR.__init__).parameters


def _without_verbose(scheduler: type, *args: Any, verbose: Any = None, **kwargs: Any) -> Any:
    return scheduler(*args, **kwargs)


class TorchBiCPlugin(BiCPlugin):
    """Avalanche's BiC with its stage-2 scheduler built without ``verbose`` (removed from torch's
    ``MultiStepLR``); the bias correction itself is Avalanche's, unchanged."""

    def bias_correction_step(self, *args: Any, **kwargs: Any) -> Any:
        from avalanche.training.plugins import bic

        original = bic.MultiStepLR
        bic.MultiStepLR = functools.partial(_without_verbose, original)
        try:
            return super().bias_correction_step(*args, **kwargs)
        finally:
            bic.MultiStepLR = original


def check_composition(strategy: Any, plugin: Any) -> None:
    """Refuse or fix, before training, what cannot work with ``plugin`` (a PEFTPlugin) in ``strategy``."""
    if isinstance(strategy, OWN_MODEL):
        raise ConfigError(
            f"strategy {type(strategy).__name__} builds and trains its own model architecture, so PEFTPlugin cannot "
            "inject adapters into it; run it without PEFTPlugin"
        )
    plugins = list(strategy.plugins)
    mine = plugins.index(plugin) if plugin in plugins else len(plugins)
    for i, other in enumerate(plugins):
        if type(other) is BiCPlugin and not _multisteplr_takes_verbose():
            other.__class__ = TorchBiCPlugin
            warnings.warn(
                "BiCPlugin passes verbose to torch's MultiStepLR, which this torch rejects; avl-peft switched it to "
                "TorchBiCPlugin (the same BiC without that argument)",
                stacklevel=3,
            )
        if type(other) is MIRPlugin:
            other.__class__ = TrainableMIRPlugin  # same state, only before_backward differs
            warnings.warn(
                "MIRPlugin differentiates every parameter, which fails on a frozen backbone; avl-peft switched it "
                "to TrainableMIRPlugin (the same MIR over the trainable parameters)",
                stacklevel=3,
            )
        if isinstance(other, PATH_INTEGRAL) and (plugin.policy != "continue" or plugin.pretrain):
            raise ConfigError(
                f"{type(other).__name__} accumulates importances along the trained parameters' path, which "
                f"{'the end of the base session' if plugin.pretrain else 'policy ' + plugin.policy} replaces between "
                "experiences; use policy='continue' without pretrain with it (or EWC/MAS)"
            )
        if i < mine and isinstance(other, SNAPSHOT_IN_BEFORE_TRAINING):
            raise ConfigError(
                f"{type(other).__name__} records every parameter before training, so it must come after PEFTPlugin "
                "in plugins (PEFTPlugin injects the adapters in its before_training)"
            )
