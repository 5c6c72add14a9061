"""Feeding a statistics head after each experience and classifying with it at evaluation (Avalanche plugin)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ...errors import ConfigError
from ...validate import check_positive_int, is_int
from .moments import AlignOptions, ClassMoments, MomentOptions, align_linear
from .statistics import StatisticsHead

FeatureFn = Callable[[Any, Tensor], Tensor]
"""(strategy, images on the strategy's device) → (N, D) features."""


def backbone_features(strategy: Any, x: Tensor) -> Tensor:
    """Features of a :class:`~avl_peft.cl.backbone.ContinualViT`: its ``backbone`` (timm, num_classes=0)."""
    return strategy.model.backbone(x)


def prompted_vit_features(strategy: Any, x: Tensor) -> Tensor:
    """Features of L2P (Avalanche LearningToPrompt): the prompted ViT's pre-logits, with prompts chosen by
    the frozen query ViT, as L2P's own forward computes them."""
    cls_features = strategy.original_vit(x)["pre_logits"]
    return strategy.model(x=x, cls_features=cls_features, train=False)["pre_logits"]


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


class _Collector:
    """Stands in for a head in :func:`update_from_dataset`: keeps the features and labels it is given."""

    def __init__(self) -> None:
        self.features: list[Tensor] = []
        self.labels: list[Tensor] = []

    def update(self, features: Tensor, labels: Tensor) -> None:
        self.features.append(features.detach().float().cpu())
        self.labels.append(torch.as_tensor(labels).reshape(-1).long().cpu())

    def result(self, dim: int) -> tuple[Tensor, Tensor]:
        if not self.features:
            return torch.zeros(0, dim), torch.zeros(0, dtype=torch.int64)
        return torch.cat(self.features), torch.cat(self.labels)


@torch.no_grad()
def update_from_dataset(
    head: StatisticsHead | _Collector,
    features: Callable[[Tensor], Tensor],
    dataset: Any,
    *,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
    model: nn.Module | None = None,
) -> int:
    """Embed ``dataset`` (items ``(x, y, …)``; its eval transforms when it has ``.eval()``) in order and add it
    to ``head``. ``features(x)`` gives (N, D); ``model`` (if given) is put in eval mode meanwhile and its
    modules' modes restored after. Returns the number of samples added."""
    batch_size = check_positive_int("batch_size", batch_size, "pass e.g. the strategy's eval_mb_size")
    if hasattr(dataset, "eval"):
        dataset = dataset.eval()  # no augmentation: the statistics describe the test-time features
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # the arrival order fixes RanPAC's validation fold
        num_workers=num_workers,
        collate_fn=getattr(dataset, "collate_fn", None),
        # A DataLoader iterator draws a seed from its generator; the global one would shift the training
        # run's random stream (shuffling, dropout) after this pass.
        generator=torch.Generator(),
    )
    modes = _modes(model) if model is not None else {}
    if model is not None:
        model.eval()
    n = 0
    try:
        for batch in loader:
            x, y = batch[0], batch[1]
            head.update(features(x.to(device)), y)
            n += int(y.shape[0])
    finally:
        _restore_modes(modes)
    return n


class StatisticsHeadPlugin(SupervisedPlugin, supports_distributed=True):
    """Feed a :class:`StatisticsHead` after every training experience and classify with it at evaluation.

    - ``after_training_exp``: the experience's own training data (``strategy.experience.dataset``, not a
      replay buffer; eval transforms, ``torch.no_grad``, model in eval mode, batches of ``batch_size`` or the
      strategy's ``eval_mb_size``) is embedded with ``feature_fn`` (default: ``strategy.model.backbone``) and
      added to the head.
    - Evaluation: a forward hook on ``strategy.model.backbone`` captures the features of each batch (no
      second forward pass; with a custom ``feature_fn`` they are computed again) and ``after_eval_forward``
      replaces ``strategy.mb_output`` by the head's scores, so Avalanche's metrics, the accuracy matrix and
      the eval loss all use this head. Classes the head has not seen get ``min(scores) − 1000``: finite (the
      eval loss stays finite, like Avalanche's -1000 mask) and below every seen class. The width is
      ``max(head slots, linear head width)``. Until the head has seen a class the output is left alone.
    - Training is untouched: the linear head still trains with the strategy's loss (e.g. train_mask
      ``current``) and its logits are what the loss sees; checkpoints keep the linear head too.
    - Task-incremental (multi-head, Avalanche ``MultiTaskModule``) models keep their linear heads: within a
      task the bias these heads remove does not arise; the plugin warns once and does nothing.
    - Evaluations inside an experience (``eval_every``) use the statistics of the experiences finished so far.
    - Under torchrun every process embeds the whole experience (identical heads, redundant work).

    With ``options`` asking for ``align`` or ``drift`` (:class:`~.moments.MomentOptions`) the plugin keeps
    per-class moments (:class:`~.moments.ClassMoments`) and, after each experience: moves the stored means
    by the drift SDC measures on this experience's data (embedded once more in ``before_training_exp``,
    before it trains), adds the experience's classes, refits the statistics head from the moments
    (``head.fit_moments``) and, with ``align``, re-trains the model's linear head (``model.head``) on
    Gaussian pseudo-features (SLCA). ``head`` may then be None: the aligned linear head is the classifier.
    Pseudo-features come from a generator seeded by (``seed``, experience index).

    ``state_dict``/``load_state_dict`` (head, moments, experience count) resume it exactly.
    """

    def __init__(
        self,
        head: StatisticsHead | None,
        *,
        feature_fn: FeatureFn | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
        options: MomentOptions | None = None,
        feature_dim: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        options = options if options is not None else MomentOptions()
        if head is None and options.align is None:
            raise ConfigError(
                "StatisticsHeadPlugin needs a statistics head (build_head('prototype'|'ranpac', ...)) or "
                "align options (training.head_options.align) for the linear head; for a plain 'linear' head "
                "add no plugin"
            )
        if head is not None and not isinstance(head, StatisticsHead):
            raise ConfigError(
                f"StatisticsHeadPlugin needs a statistics head (build_head('prototype'|'ranpac', ...)), got "
                f"{type(head).__name__}; for 'linear' add no plugin"
            )
        dim = head.feature_dim if head is not None else feature_dim
        if options.uses_moments and dim is None:
            raise ConfigError("StatisticsHeadPlugin: pass feature_dim (the backbone's feature width) with align")
        self.options, self.seed = options, int(seed)
        self.moments = ClassMoments(dim, options.covariance, options.covariance_rank) if options.uses_moments else None
        self.experiences = 0  # experiences this plugin has finished: seeds the pseudo-feature draws
        self._before: Tensor | None = None  # this experience's features before it trained (drift only)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size, "or None for the strategy's eval_mb_size")
        if not is_int(num_workers) or num_workers < 0:
            raise ConfigError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        self.head, self.feature_fn = head, feature_fn
        self.batch_size, self.num_workers = batch_size, num_workers
        self._hook: Any = None
        self._captured: Tensor | None = None
        self._active = False
        self._warned = False

    def _multi_task(self, strategy: Any) -> bool:

        if not isinstance(strategy.model, MultiTaskModule):
            return False
        if not self._warned:
            warnings.warn(
                "StatisticsHeadPlugin: a multi-head (task-incremental) model keeps its trained linear heads",
                stacklevel=2,
            )
            self._warned = True
        return True

    def _features(self, strategy: Any, x: Tensor) -> Tensor:
        return (self.feature_fn or backbone_features)(strategy, x)

    def _check_model(self, strategy: Any) -> None:
        if self.feature_fn is None and not isinstance(getattr(strategy.model, "backbone", None), nn.Module):
            raise ConfigError(
                f"StatisticsHeadPlugin: model {type(strategy.model).__name__} has no 'backbone' module to take "
                "features from; pass feature_fn (e.g. prompted_vit_features for l2p)"
            )

    def _embed(self, strategy: Any, target: StatisticsHead | _Collector) -> None:
        update_from_dataset(
            target,
            lambda x: self._features(strategy, x),
            strategy.experience.dataset,
            batch_size=self.batch_size or strategy.eval_mb_size,
            device=strategy.device,
            num_workers=self.num_workers,
            model=strategy.model,
        )

    def _embedded(self, strategy: Any) -> tuple[Tensor, Tensor]:
        collector = _Collector()
        self._embed(strategy, collector)
        return collector.result(self.moments.feature_dim)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._before = None
        if self.moments is None or self.options.drift is None or not self.moments.seen_classes:
            return
        if self._multi_task(strategy):
            return
        self._check_model(strategy)
        self._before = self._embedded(strategy)[0]  # the same samples, in the same order, as after training

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._multi_task(strategy):
            return
        self._check_model(strategy)
        if self.head is not None:
            self.head.to(strategy.device)
        if self.moments is None:
            self._embed(strategy, self.head)
        else:
            self._update_moments(strategy)
        self.experiences += 1

    def _update_moments(self, strategy: Any) -> None:
        opts, moments = self.options, self.moments
        features, labels = self._embedded(strategy)
        if opts.drift is not None and self._before is not None:
            moments.compensate(self._before, features, opts.drift.sigma)
        self._before = None
        moments.update(features, labels)
        sampling = opts.align or AlignOptions()  # how a head built from moments draws its pseudo-features
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.experiences)
        if self.head is not None:
            self.head.fit_moments(moments, sampling.samples_per_class, sampling.shrink, generator)
        if opts.align is not None:
            head = getattr(strategy.model, "head", None)
            if not isinstance(head, nn.Module):
                raise ConfigError(
                    f"align re-trains the model's linear head (model.head), which {type(strategy.model).__name__} "
                    "lacks; use align with the avl-peft ViT models (not l2p)"
                )
            align_linear(head, moments, opts.align, generator, strategy.device)

    def before_eval(self, strategy: Any, **kwargs: Any) -> None:
        self._remove_hook()
        seen = self.head is not None and bool(self.head.seen_classes)
        self._active = seen and not self._multi_task(strategy)
        if self._active:
            self._check_model(strategy)
        if self._active and self.feature_fn is None:
            self._hook = strategy.model.backbone.register_forward_hook(self._capture)
        if self._active:
            self.head.to(strategy.device)

    def _capture(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._captured = output

    def before_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
        self._captured = None

    @torch.no_grad()
    def after_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
        strategy.linear_output = strategy.mb_output  # the trained linear head's scores, for comparison
        if not self._active:
            return
        x, feats = strategy.mb_x, self._captured
        if not isinstance(feats, Tensor) or feats.dim() != 2 or feats.shape[0] != x.shape[0]:
            feats = self._features(strategy, x)  # custom feature_fn, or a model that skipped the backbone
        self._captured = None
        scores = self.head.logits(feats)
        seen = self.head.seen_mask().to(scores.device)
        old = strategy.mb_output
        width = max(self.head.n_classes, old.shape[1])
        fill = float(scores[:, seen].min()) - 1000.0 if scores.numel() else -1000.0
        out = scores.new_full((scores.shape[0], width), fill)
        out[:, : self.head.n_classes] = scores.masked_fill(~seen, fill)
        strategy.mb_output = out.to(device=old.device, dtype=old.dtype)

    def after_eval(self, strategy: Any, **kwargs: Any) -> None:
        self._remove_hook()
        self._active = False

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._captured = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "head": self.head.state_dict() if self.head is not None else None,
            "moments": self.moments.state_dict() if self.moments is not None else None,
            "experiences": self.experiences,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.head is not None:
            self.head.load_state_dict(state["head"])
        if self.moments is not None:
            if state.get("moments") is None:
                raise ConfigError("saved classifier state has no class moments; resume with the saved run's options")
            self.moments.load_state_dict(state["moments"])
        self.experiences = int(state.get("experiences", 0))
