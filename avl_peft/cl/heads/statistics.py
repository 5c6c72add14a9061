"""The statistics-head contract and the prototype head (cosine nearest-class-mean); math in the package docstring."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError, DataError
from ...validate import check_positive_int

DEFAULT_LAMBDAS: tuple[float, ...] = tuple(10.0**e for e in range(-8, 9))
MAX_RANPAC_DIM = 100_000


def default_ranpac_dim(feature_dim: int) -> int:
    """RanPAC's projection size for a backbone with ``feature_dim`` features: ``min(5000, 10·D)``."""
    return min(5000, 10 * int(feature_dim))


class StatisticsHead(ABC):
    """A classifier from accumulated per-class feature statistics (see the module docstring).

    Statistics live on ``self.device`` (CPU until :meth:`to` moves them); features given to
    :meth:`update`/:meth:`logits` are moved there, and scores come back on the features' device.
    """

    name = ""

    def __init__(self, feature_dim: int, n_classes: int | None = None):
        self.feature_dim = check_positive_int(
            "feature_dim", feature_dim, "pass the backbone's feature width (model.backbone.num_features)"
        )
        self.fixed_classes = (
            None
            if n_classes is None
            else check_positive_int("n_classes", n_classes, "pass the scenario's class count, or None to grow")
        )
        self.device = torch.device("cpu")
        # Per-class sample counts: which classes are seen, and the number of class slots K.
        self.counts = torch.zeros(self.fixed_classes or 0, dtype=torch.int64)

    # -- bookkeeping ------------------------------------------------------------------------------

    @property
    def n_classes(self) -> int:
        """Number of class slots K (columns of :meth:`logits`)."""
        return int(self.counts.numel())

    @property
    def seen_classes(self) -> list[int]:
        return [int(c) for c in torch.nonzero(self.counts > 0).flatten()]

    def seen_mask(self) -> Tensor:
        """(K,) bool on CPU: True for classes with at least one sample."""
        return self.counts.cpu() > 0

    def _check(self, features: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != self.feature_dim:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ConfigError(
                f"{self.name} head expects features of shape (N, {self.feature_dim}), got {shape}; "
                "build the head with feature_dim equal to the backbone's feature width"
            )
        if not torch.isfinite(features).all():
            raise DataError(f"{self.name} head got non-finite features (NaN or inf); check the backbone/inputs")
        if labels is None:
            return features, None
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() != features.shape[0] or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise DataError(
                f"{self.name} head needs one integer label per feature row, got {labels.numel()} labels "
                f"of dtype {labels.dtype} for {features.shape[0]} rows"
            )
        labels = labels.to(torch.int64)
        if labels.numel() and int(labels.min()) < 0:
            raise DataError(f"{self.name} head got a negative class label {int(labels.min())}")
        if self.fixed_classes is not None and labels.numel() and int(labels.max()) >= self.fixed_classes:
            raise DataError(
                f"{self.name} head was built for {self.fixed_classes} classes but got label {int(labels.max())}; "
                "pass n_classes = the scenario's class count (or None to grow)"
            )
        return features, labels

    def _grow(self, width: int) -> None:
        if width > self.n_classes:
            self.counts = torch.cat([self.counts, self.counts.new_zeros(width - self.n_classes)])
            self._grow_statistics(width)

    def _mask_unseen(self, scores: Tensor, mask_value: float) -> Tensor:
        seen = self.seen_mask().to(scores.device)
        return scores.masked_fill(~seen, mask_value)

    # -- public API -------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch: ``features`` (N, D), integer ``labels`` (N,)."""
        features, labels = self._check(features, labels)
        if labels.numel() == 0:
            return
        self._grow(int(labels.max()) + 1)
        labels = labels.to(self.device)
        self.counts = self.counts.to(self.device)
        self.counts += torch.bincount(labels, minlength=self.n_classes)
        self._accumulate(features.detach().to(self.device), labels)

    @torch.no_grad()
    def logits(self, features: Tensor, mask_value: float = float("-inf")) -> Tensor:
        """Scores (N, K) float32 on ``features``' device; classes not seen get ``mask_value``."""
        features, _ = self._check(features)
        if not self.seen_classes:
            return torch.full((features.shape[0], self.n_classes), mask_value, device=features.device)
        scores = self._scores(features.detach().to(self.device))
        return self._mask_unseen(scores, mask_value).float().to(features.device)

    def predict(self, features: Tensor) -> Tensor:
        """(N,) int64: the best-scoring class among those seen."""
        if not self.seen_classes:
            raise ConfigError(f"{self.name} head has seen no class yet; call update() with training features first")
        return self.logits(features).argmax(dim=1)

    def to(self, device: torch.device | str) -> StatisticsHead:
        """Move the statistics to ``device`` (in place; returns self)."""
        self.device = torch.device(device)
        for key, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, key, value.to(self.device))
        return self

    def fit_moments(self, moments: Any, per_class: int, shrink: float, generator: torch.Generator) -> None:
        """Replace the statistics by ones computed from stored class moments (:class:`~.moments.ClassMoments`):
        ``per_class`` features drawn from every seen class's Gaussian. The prototype head overrides this
        with its exact form (its statistics are the means)."""
        self.reset()
        feats, labels = moments.pseudo_features(per_class, shrink, generator)
        self.update(feats, labels)

    @abstractmethod
    def reset(self, classes: Sequence[int] | None = None) -> None:
        """Forget the statistics of ``classes`` (all when None), e.g. to recompute them with new features."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (for results files)."""

    @abstractmethod
    def _grow_statistics(self, width: int) -> None: ...

    @abstractmethod
    def _accumulate(self, features: Tensor, labels: Tensor) -> None: ...

    @abstractmethod
    def _scores(self, features: Tensor) -> Tensor: ...

    def _check_state(self, state: dict[str, Any], **expected: Any) -> None:
        if not isinstance(state, dict) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, dict) else type(state).__name__
            raise ConfigError(f"state is for head {got!r}, not {self.name!r}; build the head it was saved from")
        for key, value in expected.items():
            if state.get(key) != value:
                raise ConfigError(
                    f"{self.name} head state has {key}={state.get(key)!r} but this head has {key}={value!r}; "
                    "build the head with the options of the saved run"
                )


class PrototypeHead(StatisticsHead):
    """Cosine nearest-class-mean (SimpleCIL / APER): class sums (K, D) and counts (K,), float64."""

    name = "prototype"

    def __init__(self, feature_dim: int, n_classes: int | None = None):
        super().__init__(feature_dim, n_classes)
        # float64: a class sum over thousands of features would lose digits in float32.
        self.sums = torch.zeros(self.n_classes, self.feature_dim, dtype=torch.float64)

    def _grow_statistics(self, width: int) -> None:
        self.sums = torch.cat([self.sums, self.sums.new_zeros(width - self.sums.shape[0], self.feature_dim)])

    def _accumulate(self, features: Tensor, labels: Tensor) -> None:
        self.sums = self.sums.to(self.device)
        self.sums.index_add_(0, labels, features.double())

    def fit_moments(self, moments: Any, per_class: int, shrink: float, generator: torch.Generator) -> None:
        """Prototypes are the stored (drift-compensated) means, exactly: sums = μ_c · n_c."""
        self._grow(moments.n_classes)
        k = moments.n_classes
        self.counts = self.counts.to(self.device)
        self.counts[:k] = moments.counts.to(self.device)
        self.sums = self.sums.to(self.device)
        self.sums[:k] = moments.means.to(self.device) * moments.counts.to(self.device, torch.float64)[:, None]

    def means(self) -> Tensor:
        """(K, D) float64 class means; rows of unseen classes are zero."""
        return self.sums / self.counts.clamp_min(1).to(self.sums)[:, None]

    def _scores(self, features: Tensor) -> Tensor:
        return F.normalize(features.double(), dim=1) @ F.normalize(self.means(), dim=1).T

    def reset(self, classes: Sequence[int] | None = None) -> None:
        idx = torch.arange(self.n_classes) if classes is None else torch.as_tensor(list(classes), dtype=torch.int64)
        idx = idx[idx < self.n_classes].to(self.device)
        self.sums[idx] = 0
        self.counts[idx] = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "feature_dim": self.feature_dim,
            "sums": self.sums.detach().cpu().clone(),
            "counts": self.counts.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, feature_dim=self.feature_dim)
        sums, counts = state["sums"], state["counts"]
        if self.fixed_classes is not None and counts.numel() != self.fixed_classes:
            raise ConfigError(f"prototype head state has {counts.numel()} classes, this head {self.fixed_classes}")
        self.sums, self.counts = sums.to(self.device, torch.float64), counts.to(self.device, torch.int64)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "classes": len(self.seen_classes), "samples": int(self.counts.sum())}
