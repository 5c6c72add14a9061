r"""Classifiers without class-incremental bias: "statistics" heads on the backbone's features.

A linear head trained experience by experience favours the classes it trained last (its logits for old
classes are never pushed up again). The heads here are not trained by gradient descent: they accumulate
per-class statistics of the backbone's features ``f ∈ R^D`` and classify from those, so every class is
scored by the same rule whenever it arrived.

``training.head`` choices (registry :data:`HEADS`):

``linear``
    The model's own trained head (Avalanche ``IncrementalClassifier``); :func:`build_head` returns ``None``.

``prototype`` — cosine nearest-class-mean (SimpleCIL / APER, Zhou et al. 2023)
    Per class c: count ``n_c`` and feature sum ``s_c = Σ_{i: y_i=c} f_i`` (float64, shape (K, D)); the
    prototype is ``μ_c = s_c / n_c``. Score ``z_c(f) = <f, μ_c> / (‖f‖ ‖μ_c‖)`` (cosine), prediction
    ``argmax_c z_c`` over the classes seen.

    When are means computed? Only the current experience's data is available in continual learning, so
    the default (what :class:`StatisticsHeadPlugin` does) follows SimpleCIL: a class's mean is computed
    from its training data with the backbone as it is at the end of the experience that brings the class,
    and is then kept. If a class comes back in a later experience its new samples are added to the same
    sums (so accumulating experience by experience equals computing on all the data at once). A caller that
    still has data of old classes can recompute them with the current backbone: ``head.reset(classes)``
    then :func:`update_from_dataset`.

``ranpac`` — random projection + class-prototype ridge regression (McDonnell et al., NeurIPS 2023)
    A fixed Gaussian projection ``W_rp ∈ R^{D×M}`` (entries N(0, 1), drawn once from ``seed``) and
    ``h = ReLU(f W_rp) ∈ R^M``. Accumulated over every sample of every experience (float64):

    - Gram matrix ``G = Σ_i h_i h_iᵀ`` (M×M);
    - class sums ``C = Σ_i h_i y_iᵀ`` (M×K, ``y_i`` one-hot);

    and the output weights ``W = (G + λ I)^{-1} C`` (M×K); score ``z(f) = h(f) W``, prediction
    ``argmax_c z_c`` over the classes seen.

    Choosing λ. RanPAC picks λ from a grid by fitting on part of the training data and scoring on the
    rest. Only statistics are kept here (no features), so the split is made as the samples arrive: sample
    number ``i`` of the head's whole stream (counted across experiences, in arrival order) goes to the
    validation fold when ``u(seed, i) < val_fraction``, with ``u`` a fixed integer hash (splitmix64) mapped
    to [0, 1). Its statistics are kept apart as well (``G_val``, ``C_val``), so the fit fold is
    ``G_fit = G − G_val``, ``C_fit = C − C_val``. The validation loss of a λ is the ridge objective's own
    squared error, which needs only statistics:

    ``L(λ) = Σ_{i∈val} ‖y_i − h_i W_λ‖² = n_val − 2 tr(W_λᵀ C_val) + tr(W_λᵀ G_val W_λ)``,
    ``W_λ = (G_fit + λI)^{-1} C_fit`` (evaluated for the whole grid from one eigendecomposition of
    ``G_fit``). The λ with the smallest L wins (exact ties: the larger λ); the final W is then solved on
    all the data, ``(G + λI)^{-1} C``. The default grid is ``10^-8, 10^-7, …, 10^8``. If either fold is
    empty (a handful of samples) the grid's median is used. Because the split depends only on the arrival
    index, feeding the same samples in the same order experience by experience or all at once gives the
    same folds, statistics, λ and W. Accuracy would need the features themselves, hence the squared error.

    Size. ``M`` (option ``dim``) defaults to ``min(5000, 10·D)``: 5000 for ViT-B (D = 768), as in RanPAC,
    and proportionally less for small backbones (1920 for ViT-Ti, D = 192), whose features need less
    expansion. Memory: ``G`` and ``G_val`` are 2·M²·8 bytes (400 MB at M = 5000); a solve costs O(M³)
    (about a second on a GPU, some tens of seconds on a CPU at M = 5000) and runs lazily, once per change
    of the statistics.

All heads score a batch ``features`` (N, D) as a (N, K) tensor where K is the number of class slots
(``n_classes`` if given, else the largest label seen + 1); classes not seen get ``-inf`` so ``argmax``
behaves like Avalanche's masked incremental head. ``state_dict()`` holds plain tensors and numbers
(``torch.load(weights_only=True)`` reads it back) for resuming.

:class:`StatisticsHeadPlugin` embeds each training experience after it is trained and replaces the class-
incremental evaluation output by the head's scores; training (the linear head, its loss mask) is untouched.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..errors import ConfigError, DataError
from ..registry import Registry, suggest

DEFAULT_LAMBDAS: tuple[float, ...] = tuple(10.0**e for e in range(-8, 9))
MAX_RANPAC_DIM = 100_000


def default_ranpac_dim(feature_dim: int) -> int:
    """RanPAC's projection size for a backbone with ``feature_dim`` features: ``min(5000, 10·D)``."""
    return min(5000, 10 * int(feature_dim))


def _positive_int(what: str, value: Any, fix: str, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}; {fix}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{what} must be at most {maximum}, got {value!r}; {fix}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------


class StatisticsHead(ABC):
    """A classifier from accumulated per-class feature statistics (see the module docstring).

    Statistics live on ``self.device`` (CPU until :meth:`to` moves them); features given to
    :meth:`update`/:meth:`logits` are moved there, and scores come back on the features' device.
    """

    name = ""

    def __init__(self, feature_dim: int, n_classes: int | None = None):
        self.feature_dim = _positive_int(
            "feature_dim", feature_dim, "pass the backbone's feature width (model.backbone.num_features)"
        )
        self.fixed_classes = (
            None
            if n_classes is None
            else _positive_int("n_classes", n_classes, "pass the scenario's class count, or None to grow")
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


def _splitmix64(index: np.ndarray, seed: int) -> np.ndarray:
    """Output number ``index`` of a splitmix64 generator started at ``seed`` (a fixed integer hash, uint64):
    state ``seed + (index + 1)·γ`` (modulo 2^64), then the splitmix64 finaliser."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) + (index.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class RanpacHead(StatisticsHead):
    """RanPAC: ReLU random projection to M dims, Gram/class-sum statistics, ridge output weights."""

    name = "ranpac"

    def __init__(
        self,
        feature_dim: int,
        n_classes: int | None = None,
        *,
        dim: int | None = None,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        val_fraction: float = 0.2,
        seed: int = 0,
    ):
        super().__init__(feature_dim, n_classes)
        opts = RanpacHeadOptions(dim=dim, lambdas=lambdas, val_fraction=val_fraction)
        self.dim = opts.dim if opts.dim is not None else default_ranpac_dim(self.feature_dim)
        self.lambdas, self.val_fraction = tuple(sorted(opts.lambdas)), opts.val_fraction
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"ranpac seed must be an integer, got {seed!r}; pass the run's seed")
        self.seed = int(seed)
        # Drawn on the CPU from its own generator: the same W_rp on every device and independent of the
        # global RNG (building the head must not shift the training run's random stream).
        gen = torch.Generator().manual_seed(self.seed)
        self.projection = torch.randn(self.feature_dim, self.dim, generator=gen)
        m = self.dim
        self.gram = torch.zeros(m, m, dtype=torch.float64)
        self.gram_val = torch.zeros(m, m, dtype=torch.float64)
        self.class_sums = torch.zeros(m, self.n_classes, dtype=torch.float64)
        self.class_sums_val = torch.zeros(m, self.n_classes, dtype=torch.float64)
        self.counts_val = torch.zeros(self.n_classes, dtype=torch.int64)
        self.samples = 0  # arrival index of the next sample: decides its fold
        self._weights: Tensor | None = None  # cached W (M, K), cleared by every change of the statistics
        self._lambda: float | None = None

    # -- statistics -------------------------------------------------------------------------------

    def project(self, features: Tensor) -> Tensor:
        """h = ReLU(f W_rp): (N, D) → (N, M) float32 on the head's device."""
        features, _ = self._check(features)
        return torch.relu(features.float().to(self.device) @ self.projection.to(self.device))

    def validation_split(self, n: int, start: int = 0) -> Tensor:
        """(n,) bool: which of the samples number ``start … start+n-1`` belong to the validation fold."""
        z = _splitmix64(np.arange(start, start + n, dtype=np.uint64), self.seed)
        u = (z >> np.uint64(11)).astype(np.float64) / float(2**53)  # top 53 bits → uniform in [0, 1)
        return torch.from_numpy(u < self.val_fraction)

    def _grow_statistics(self, width: int) -> None:
        extra = width - self.class_sums.shape[1]
        self.class_sums = torch.cat([self.class_sums, self.class_sums.new_zeros(self.dim, extra)], dim=1)
        self.class_sums_val = torch.cat([self.class_sums_val, self.class_sums_val.new_zeros(self.dim, extra)], dim=1)
        self.counts_val = torch.cat([self.counts_val, self.counts_val.new_zeros(extra)])

    def _accumulate(self, features: Tensor, labels: Tensor) -> None:
        n = labels.numel()
        val = self.validation_split(n, self.samples).to(self.device)
        self.samples += n
        h = self.project(features).double()
        onehot = F.one_hot(labels, self.n_classes).double()
        for name in ("gram", "gram_val", "class_sums", "class_sums_val", "counts_val"):
            setattr(self, name, getattr(self, name).to(self.device))
        self.gram += h.T @ h
        self.class_sums += h.T @ onehot
        hv, yv = h[val], onehot[val]
        self.gram_val += hv.T @ hv
        self.class_sums_val += hv.T @ yv
        self.counts_val += torch.bincount(labels[val], minlength=self.n_classes)
        self._weights = None

    # -- solving ----------------------------------------------------------------------------------

    def validation_losses(self) -> dict[float, float] | None:
        """L(λ) for every λ of the grid (sum of squared errors on the validation fold), or None when a fold
        is empty. One eigendecomposition ``G_fit = Q diag(s) Qᵀ`` gives ``W_λ = Q diag(1/(s+λ)) Qᵀ C_fit``."""
        seen = self.seen_mask().to(self.device)
        n_val = int(self.counts_val[seen].sum())
        n_fit = int(self.counts[seen].sum()) - n_val
        if n_val == 0 or n_fit == 0:
            return None
        g_fit = self.gram - self.gram_val
        c_fit, c_val = (self.class_sums - self.class_sums_val)[:, seen], self.class_sums_val[:, seen]
        s, q = torch.linalg.eigh(g_fit)
        s = s.clamp_min(0)  # G_fit is PSD; rounding can leave tiny negative eigenvalues
        a, b = q.T @ c_fit, q.T @ c_val
        h = q.T @ self.gram_val @ q
        losses = {}
        for lam in self.lambdas:
            p = a / (s + lam)[:, None]  # Qᵀ W_λ
            losses[lam] = float(n_val - 2 * (p * b).sum() + (p * (h @ p)).sum())
        return losses

    def _solve(self) -> None:
        if len(self.lambdas) == 1:
            lam = self.lambdas[0]
        else:
            losses = self.validation_losses()
            if losses is None:
                lam = self.lambdas[len(self.lambdas) // 2]
            else:
                # Ascending grid with "<=": among exactly equal losses the larger λ (more regularised) wins.
                lam = self.lambdas[0]
                for cand in self.lambdas:
                    if losses[cand] <= losses[lam]:
                        lam = cand
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.device)
        self._weights = torch.linalg.solve(self.gram + lam * eye, self.class_sums)
        self._lambda = float(lam)

    @property
    def weights(self) -> Tensor:
        """W = (G + λI)^{-1} C, (M, K) float64 (solved on first use after a change)."""
        if self._weights is None:
            if not self.seen_classes:
                raise ConfigError("ranpac head has seen no class yet; call update() with training features first")
            self._solve()
        return self._weights

    @property
    def ridge(self) -> float:
        """The λ in use (chosen on the validation fold unless the grid has one value)."""
        _ = self.weights
        return float(self._lambda)

    def _scores(self, features: Tensor) -> Tensor:
        return self.project(features).double() @ self.weights

    def reset(self, classes: Sequence[int] | None = None) -> None:
        """Forget everything. The Gram matrix mixes all classes, so only a full reset is possible."""
        if classes is not None and not set(self.seen_classes) <= set(int(c) for c in classes):
            raise ConfigError(
                "ranpac head can only forget all classes at once (its Gram matrix mixes them); call reset() and "
                "update() with data of every class"
            )
        for name in ("gram", "gram_val", "class_sums", "class_sums_val", "counts_val", "counts"):
            getattr(self, name).zero_()
        self.samples, self._weights, self._lambda = 0, None, None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "name": self.name,
            "feature_dim": self.feature_dim,
            "dim": self.dim,
            "seed": self.seed,
            "samples": self.samples,
        }
        for name in ("projection", "gram", "gram_val", "class_sums", "class_sums_val", "counts", "counts_val"):
            state[name] = getattr(self, name).detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, feature_dim=self.feature_dim, dim=self.dim)
        k = state["counts"].numel()
        if self.fixed_classes is not None and k != self.fixed_classes:
            raise ConfigError(f"ranpac head state has {k} classes, this head {self.fixed_classes}")
        # The stored projection wins over the one drawn from the seed: a resumed run must keep its W_rp
        # even if another torch version would draw different numbers.
        self.projection = state["projection"].to(self.device, torch.float32)
        self.seed, self.samples = int(state["seed"]), int(state["samples"])
        for name in ("gram", "gram_val", "class_sums", "class_sums_val"):
            setattr(self, name, state[name].to(self.device, torch.float64))
        self.counts = state["counts"].to(self.device, torch.int64)
        self.counts_val = state["counts_val"].to(self.device, torch.int64)
        self._weights, self._lambda = None, None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dim": self.dim,
            "classes": len(self.seen_classes),
            "samples": int(self.counts.sum()),
            "validation_samples": int(self.counts_val.sum()),
        }
        if self.seen_classes:
            out["lambda"] = self.ridge
        return out


# --------------------------------------------------------------------------------------------------
# Options and registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearHeadOptions:
    """The trained linear head takes no options."""


@dataclass(frozen=True)
class PrototypeHeadOptions:
    """Cosine nearest-class-mean takes no options."""


@dataclass(frozen=True)
class RanpacHeadOptions:
    """``dim``: projection size M (None → ``min(5000, 10·D)``); ``lambdas``: the ridge grid (one value →
    fixed λ); ``val_fraction``: share of samples in the validation fold that picks λ."""

    dim: int | None = None
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.dim is not None:
            _positive_int(
                "ranpac option 'dim'", self.dim, "use e.g. 5000, or leave it out for min(5000, 10·D)", MAX_RANPAC_DIM
            )
        lambdas = (self.lambdas,) if isinstance(self.lambdas, (int, float)) else self.lambdas
        try:
            values = tuple(float(v) for v in lambdas if not isinstance(v, bool))
            ok = len(values) == len(lambdas) and len(values) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok or not all(math.isfinite(v) and v > 0 for v in values):
            raise ConfigError(
                f"ranpac option 'lambdas' must be a positive number or a non-empty list of positive numbers, got "
                f"{self.lambdas!r}; e.g. [1.0e-4, 1.0e-2, 1.0, 100.0], or leave it out for 1e-8 … 1e8"
            )
        object.__setattr__(self, "lambdas", tuple(sorted(set(values))))
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 1:
            raise ConfigError(
                f"ranpac option 'val_fraction' must be a number strictly between 0 and 1, got {vf!r}; e.g. 0.2"
            )
        object.__setattr__(self, "val_fraction", float(vf))


@dataclass(frozen=True)
class HeadSpec:
    """A registry entry: the options dataclass and the factory (None: keep the model's trained head)."""

    options: type
    factory: Callable[..., StatisticsHead] | None


HEADS: Registry[HeadSpec] = Registry("classifier head")
HEADS.register("linear", "the trained linear head (Avalanche IncrementalClassifier)")(HeadSpec(LinearHeadOptions, None))
HEADS.register("prototype", "cosine nearest-class-mean on the backbone's features (SimpleCIL/APER)")(
    HeadSpec(PrototypeHeadOptions, lambda feature_dim, n_classes, seed, opts: PrototypeHead(feature_dim, n_classes))
)
HEADS.register("ranpac", "random ReLU projection + ridge regression on class statistics (RanPAC)")(
    HeadSpec(
        RanpacHeadOptions,
        lambda feature_dim, n_classes, seed, opts: RanpacHead(
            feature_dim, n_classes, dim=opts.dim, lambdas=opts.lambdas, val_fraction=opts.val_fraction, seed=seed
        ),
    )
)


def head_options(name: str, **options: Any) -> Any:
    """Validate ``options`` for head ``name``; the options dataclass (ConfigError naming the bad option)."""
    spec = HEADS.get(name)
    allowed = [f.name for f in fields(spec.options)]
    for key in options:
        if key not in allowed:
            listed = ", ".join(allowed) if allowed else "none"
            raise ConfigError(
                f"unknown option '{key}' for classifier head '{name}'. Allowed options: {listed}."
                + suggest(key, allowed)
            )
    return spec.options(**options)


def build_head(
    name: str, feature_dim: int, n_classes: int | None = None, seed: int = 0, **options: Any
) -> StatisticsHead | None:
    """The head ``name`` for features of width ``feature_dim``; ``None`` for ``linear`` (keep the model's).

    ``n_classes`` fixes the number of class slots (None: grow with the largest label seen); ``seed`` draws
    RanPAC's projection and validation split.
    """
    spec = HEADS.get(name)
    opts = head_options(name, **options)
    if spec.factory is None:
        return None
    return spec.factory(feature_dim, n_classes, seed, opts)


# --------------------------------------------------------------------------------------------------
# Feeding a head and the Avalanche plugin
# --------------------------------------------------------------------------------------------------

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


@torch.no_grad()
def update_from_dataset(
    head: StatisticsHead,
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
    batch_size = _positive_int("batch_size", batch_size, "pass e.g. the strategy's eval_mb_size")
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

    ``state_dict``/``load_state_dict`` (the head's) resume it.
    """

    def __init__(
        self,
        head: StatisticsHead,
        *,
        feature_fn: FeatureFn | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        if not isinstance(head, StatisticsHead):
            raise ConfigError(
                f"StatisticsHeadPlugin needs a statistics head (build_head('prototype'|'ranpac', ...)), got "
                f"{type(head).__name__}; for 'linear' add no plugin"
            )
        if batch_size is not None:
            _positive_int("batch_size", batch_size, "or None for the strategy's eval_mb_size")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        self.head, self.feature_fn = head, feature_fn
        self.batch_size, self.num_workers = batch_size, num_workers
        self._hook: Any = None
        self._captured: Tensor | None = None
        self._active = False
        self._warned = False

    def _multi_task(self, strategy: Any) -> bool:
        from avalanche.models import MultiTaskModule

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

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._multi_task(strategy):
            return
        self._check_model(strategy)
        self.head.to(strategy.device)
        update_from_dataset(
            self.head,
            lambda x: self._features(strategy, x),
            strategy.experience.dataset,
            batch_size=self.batch_size or strategy.eval_mb_size,
            device=strategy.device,
            num_workers=self.num_workers,
            model=strategy.model,
        )

    def before_eval(self, strategy: Any, **kwargs: Any) -> None:
        self._remove_hook()
        self._active = bool(self.head.seen_classes) and not self._multi_task(strategy)
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
        return {"head": self.head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
