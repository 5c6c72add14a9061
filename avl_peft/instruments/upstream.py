r"""Upstream retention: how much of the pretrained backbone's original competence survives continual training.

A fixed upstream set (images of the task the checkpoint was trained on, e.g. ImageNet classes) is scored
before training (``a_-1``) and after every experience (``a_0, a_1, …``) with one of two probes:

``checkpoint``
    The checkpoint's own classifier ``nn.Linear`` (D → K_up), copied and frozen before training and kept
    outside the model, applied to the backbone's *pre-logits* features:
    ``logits = φ(x) Wᵀ + b`` with ``φ(x) = backbone.forward_head(backbone.forward_features(x), pre_logits=True)``
    (N, D). In :class:`~avl_peft.cl.backbone.ContinualViT` the timm backbone is built with ``num_classes=0``,
    so its head is ``Identity`` and ``backbone(x)`` *is* ``φ(x)``; :func:`pre_logits_features` uses the
    explicit timm calls so a backbone that still carries a classifier gives the same φ.

``knn``
    Cosine k-nearest-neighbours of the upstream test set among the upstream train set, both embedded with
    the backbone as it is now (:func:`knn_accuracy`): retention of the representation, without any head.

:func:`upstream_summary` turns the accuracy list into ``retention = a_last / a_-1`` and
``forgetting = a_-1 − a_last``. :class:`UpstreamRetentionPlugin` records the accuracies during an Avalanche
run; :func:`build_probe` makes the probe from an upstream set (:mod:`avl_peft.cl.scenarios.upstream`) and,
for ``checkpoint``, :func:`checkpoint_classifier`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from ..backbones import create_backbone, read_state_dict
from ..errors import ConfigError
from ..validate import check_positive_int

MODES = ("checkpoint", "knn")


# --------------------------------------------------------------------------------------------------
# k-NN
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int, *, chunk: int = 1024) -> Tensor:
    """Cosine k-NN labels (M,) for ``test_feats`` (M, D) among ``train_feats`` (N, D) with ``train_labels`` (N,).

    Rows are L2-normalised (an all-zero row has similarity 0 to everything). For each test row the k train
    rows of highest cosine similarity vote, one vote each; the label with most votes wins, ties broken by the
    larger summed similarity of its voters, then by the smaller label. Which of several train rows at exactly
    the same similarity fills the k-th place is ``torch.topk``'s choice. Test rows are processed ``chunk`` at a
    time, so at most ``chunk × N`` similarities exist at once.
    """
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ConfigError(
            f"knn needs train and test features of shape (N, D) and (M, D), got {tuple(train_feats.shape)} and "
            f"{tuple(test_feats.shape)}"
        )
    train_labels = torch.as_tensor(train_labels).reshape(-1).long()
    if train_labels.numel() != train_feats.shape[0] or train_feats.shape[0] == 0:
        raise ConfigError(
            f"knn needs a non-empty train set with one label per row, got {train_feats.shape[0]} rows and "
            f"{train_labels.numel()} labels"
        )
    k = check_positive_int("k", k, "use e.g. 20")
    if k > train_feats.shape[0]:
        raise ConfigError(f"k={k} exceeds the {train_feats.shape[0]} train samples; lower k")
    chunk = check_positive_int("chunk", chunk, "use e.g. 1024")
    device = train_feats.device
    classes, label_idx = torch.unique(train_labels.to(device), sorted=True, return_inverse=True)
    train_n = F.normalize(train_feats.float(), dim=1)
    preds = []
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start : start + chunk].to(device).float(), dim=1)
        sims, nn_idx = (q @ train_n.T).topk(k, dim=1)
        votes = label_idx[nn_idx]  # (c, k) indices into `classes`
        counts = torch.zeros(q.shape[0], classes.numel(), device=device).scatter_add_(1, votes, torch.ones_like(sims))
        sim_sum = torch.zeros(q.shape[0], classes.numel(), device=device, dtype=torch.float64)
        sim_sum.scatter_add_(1, votes, sims.double())
        best = counts == counts.max(dim=1, keepdim=True).values
        # argmax returns the first maximum: among equal summed similarities, the smallest label.
        preds.append(classes[sim_sum.masked_fill(~best, float("-inf")).argmax(dim=1)])
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=device)


def knn_accuracy(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, k: int, *, chunk: int = 1024
) -> float:
    """Fraction of test rows whose :func:`knn_predict` label equals ``test_labels``."""
    test_labels = torch.as_tensor(test_labels).reshape(-1).long()
    if test_labels.numel() != test_feats.shape[0] or test_labels.numel() == 0:
        raise ConfigError(
            f"knn needs a non-empty test set with one label per row, got {test_feats.shape[0]} rows and "
            f"{test_labels.numel()} labels"
        )
    pred = knn_predict(train_feats, train_labels, test_feats, k, chunk=chunk)
    return float((pred.cpu() == test_labels.cpu()).float().mean())


# --------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------


def pre_logits_features(backbone: nn.Module, x: Tensor) -> Tensor:
    """φ(x): the features a timm classifier's head reads, (N, D).

    ``forward_head(forward_features(x), pre_logits=True)`` (pooling and final norm, no classifier) when the
    backbone is a timm model; this equals ``backbone(x)`` when it was built with ``num_classes=0`` (as in
    ContinualViT) and stays the pre-logits features when it still has a classifier. Other modules: ``backbone(x)``.
    """
    if hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head"):
        return backbone.forward_head(backbone.forward_features(x), pre_logits=True)
    return backbone(x)


def _batches(images_or_loader: Tensor | Iterable, batch_size: int) -> Iterable[Tensor]:
    if isinstance(images_or_loader, Tensor):
        for start in range(0, images_or_loader.shape[0], batch_size):
            yield images_or_loader[start : start + batch_size]
        return
    for batch in images_or_loader:
        yield batch[0] if isinstance(batch, (list, tuple)) else batch  # (x, y, …) from a DataLoader


@torch.no_grad()
def embed(
    backbone: nn.Module,
    images_or_loader: Tensor | Iterable,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    *,
    features: Callable[[nn.Module, Tensor], Tensor] = pre_logits_features,
) -> Tensor:
    """Pre-logits features (N, D), float32 on the CPU, of an image tensor (N, C, H, W) or of a loader's batches.

    The backbone runs in eval mode under ``torch.no_grad`` on ``device`` (default: where its parameters are);
    every submodule's train/eval mode is restored afterwards (a mixed state too).
    """
    batch_size = check_positive_int("batch_size", batch_size, "use e.g. 256")
    if device is None:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        out = [features(backbone, x.to(device)).float().cpu() for x in _batches(images_or_loader, batch_size)]
    finally:
        for module, training in modes.items():
            module.training = training
    if not out:
        raise ConfigError("embed got no images; give a non-empty tensor or loader")
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------------------------------


def frozen_classifier(source: nn.Module) -> nn.Linear:
    """A frozen copy of a checkpoint's classifier: an ``nn.Linear`` itself, or a timm model's
    ``get_classifier()`` (build that model with the checkpoint's number of classes)."""
    linear = source if isinstance(source, nn.Linear) else getattr(source, "get_classifier", lambda: None)()
    if not isinstance(linear, nn.Linear):
        raise ConfigError(
            f"checkpoint mode needs the checkpoint's classifier as nn.Linear, got {type(linear).__name__}; build the "
            "timm model with the checkpoint's num_classes (not 0) and pass it, or use mode 'knn'"
        )
    linear = copy.deepcopy(linear).float().cpu().eval()
    for p in linear.parameters():
        p.requires_grad_(False)
    return linear


def _check_set(what: str, images: Tensor | None, labels: Tensor | None) -> tuple[Tensor, Tensor]:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else images
        raise ConfigError(f"upstream {what} images must be a non-empty (N, C, H, W) tensor, got {shape}")
    labels = torch.as_tensor(labels).reshape(-1).long() if labels is not None else None
    if labels is None or labels.numel() != images.shape[0]:
        raise ConfigError(f"upstream {what} labels must be one integer per image ({images.shape[0]})")
    return images, labels


class UpstreamProbe:
    """A fixed upstream set and a way to score a backbone on it (see the module docstring).

    :param test_images: (N, C, H, W) already in the backbone's input format (:mod:`avl_peft.cl.scenarios.upstream`).
    :param mode: ``checkpoint`` (needs ``classifier``) or ``knn`` (needs ``train_images``/``train_labels``, ``k``).
    :param classifier: the checkpoint's classifier (``nn.Linear`` or the timm model holding it); a frozen copy
        is kept, so later training of the model never reaches it.
    """

    def __init__(
        self,
        test_images: Tensor,
        test_labels: Tensor,
        *,
        mode: str = "knn",
        classifier: nn.Module | None = None,
        train_images: Tensor | None = None,
        train_labels: Tensor | None = None,
        k: int = 20,
        batch_size: int = 256,
        device: torch.device | str | None = None,
    ):
        if mode not in MODES:
            raise ConfigError(f"upstream probe mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.test_images, self.test_labels = _check_set("test", test_images, test_labels)
        self.batch_size = check_positive_int("batch_size", batch_size, "use e.g. 256")
        self.device = device
        self.classifier: nn.Linear | None = None
        self.train_images = self.train_labels = None
        self.k = k
        if mode == "checkpoint":
            if classifier is None:
                raise ConfigError("upstream probe mode 'checkpoint' needs the checkpoint's classifier (classifier=...)")
            self.classifier = frozen_classifier(classifier)
            n_out = self.classifier.out_features
            if int(self.test_labels.max()) >= n_out or int(self.test_labels.min()) < 0:
                raise ConfigError(
                    f"upstream test labels must index the checkpoint's {n_out} classes, got range "
                    f"{int(self.test_labels.min())}..{int(self.test_labels.max())}; map the folders to its class ids"
                )
        else:
            self.train_images, self.train_labels = _check_set("train", train_images, train_labels)
            self.k = check_positive_int("k", k, "use e.g. 20")
            if self.k > self.train_images.shape[0]:
                raise ConfigError(f"k={self.k} exceeds the {self.train_images.shape[0]} upstream train images")

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module) -> float:
        """Top-1 accuracy of ``backbone`` (e.g. ``model.backbone`` of a ContinualViT) on the upstream test set."""
        test = embed(backbone, self.test_images, self.batch_size, self.device)
        if self.mode == "knn":
            train = embed(backbone, self.train_images, self.batch_size, self.device)
            return knn_accuracy(train, self.train_labels, test, self.test_labels, self.k)
        if test.shape[1] != self.classifier.in_features:
            raise ConfigError(
                f"the checkpoint's classifier reads {self.classifier.in_features} features but the backbone gives "
                f"{test.shape[1]}; is it the same architecture?"
            )
        pred = self.classifier(test).argmax(dim=1)
        return float((pred == self.test_labels).float().mean())


class UpstreamRetentionPlugin(SupervisedPlugin, supports_distributed=True):
    """Records ``acc = [a_-1, a_0, …]``: ``probe.evaluate(backbone)`` before the first training experience and
    after each one (``backbone``: ``strategy.model.backbone`` unless ``get_backbone`` says otherwise).
    Under torchrun every process scores the whole set (identical values)."""

    def __init__(self, probe: UpstreamProbe, get_backbone: Callable[[Any], nn.Module] | None = None):
        super().__init__()
        self.probe = probe
        self.get_backbone = get_backbone or (lambda strategy: strategy.model.backbone)
        self.acc: list[float] = []
        self.seconds = 0.0  # wall time spent evaluating

    def _measure(self, strategy: Any) -> None:
        start = time.perf_counter()
        self.acc.append(self.probe.evaluate(self.get_backbone(strategy)))
        self.seconds += time.perf_counter() - start
        # TensorBoard: step 0 is the model as built (experience −1), step t + 1 after experience t.
        for logger in getattr(getattr(strategy, "evaluator", None), "loggers", None) or []:
            writer = getattr(logger, "writer", None)
            if writer is not None and hasattr(writer, "add_scalar"):
                writer.add_scalar("upstream/acc", self.acc[-1], len(self.acc) - 1)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if not self.acc:
            self._measure(strategy)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._measure(strategy)

    def summary(self) -> dict[str, Any]:
        return upstream_summary(self.acc)

    def state_dict(self) -> dict[str, Any]:
        return {"acc": list(self.acc), "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc = [float(a) for a in state["acc"]]
        self.seconds = float(state.get("seconds", 0.0))


def upstream_summary(acc: Sequence[float]) -> dict[str, Any]:
    """``{acc: [a_-1, a_0, …], retention: a_last / a_-1, forgetting: a_-1 − a_last}``.

    ``a_-1`` is the accuracy before any training. ``retention`` is None when ``a_-1`` is 0 (the ratio is
    undefined: the checkpoint knew nothing of the upstream set to retain).
    """
    acc = [float(a) for a in acc]
    if not acc:
        raise ConfigError("upstream_summary needs at least the accuracy before training (a_-1)")
    first, last = acc[0], acc[-1]
    return {"acc": acc, "retention": last / first if first != 0 else None, "forgetting": first - last}


# --------------------------------------------------------------------------------------------------
# Building a probe from a checkpoint
# --------------------------------------------------------------------------------------------------


def checkpoint_classifier(name: str, checkpoint: str | Path, **timm_kwargs: Any) -> nn.Linear:
    """The classifier stored in a backbone checkpoint (timm model ``name``), as an ``nn.Linear`` sized from the
    file."""
    state = read_state_dict(Path(checkpoint))
    weight = state.get("head.weight")
    if weight is None or weight.dim() != 2:
        raise ConfigError(
            f"upstream.head: checkpoint needs the checkpoint's classifier, but '{checkpoint}' has no head.weight; "
            "use upstream.head: knn"
        )
    model = create_backbone(name, checkpoint=checkpoint, num_classes=int(weight.shape[0]), **timm_kwargs)
    return model.get_classifier()


def build_probe(
    sets: tuple[Tensor, Tensor, Tensor, Tensor], mode: str, *, k: int, classifier: nn.Linear | None, dataset: str
) -> UpstreamProbe:
    """The probe over ``sets`` (reference images, labels, query images, labels) of upstream ``dataset``; in
    ``checkpoint`` mode the query labels must be the classifier's classes."""
    tx, ty, qx, qy = sets
    if mode != "checkpoint":
        return UpstreamProbe(qx, qy, mode=mode, train_images=tx, train_labels=ty, k=k)
    if int(qy.max()) + 1 != classifier.out_features:
        raise ConfigError(
            f"upstream.dataset '{dataset}' has {int(qy.max()) + 1} classes but the checkpoint's classifier "
            f"has {classifier.out_features}; they must be the same classes in the same order (or use "
            "upstream.head: knn)"
        )
    return UpstreamProbe(qx, qy, mode="checkpoint", classifier=classifier)
