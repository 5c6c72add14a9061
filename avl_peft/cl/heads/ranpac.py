"""RanPAC: fixed random ReLU projection + ridge regression on accumulated class statistics (package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from ...validate import check_positive_int, is_finite, is_int, is_number
from .moments import MomentOptions
from .statistics import DEFAULT_LAMBDAS, MAX_RANPAC_DIM, StatisticsHead, default_ranpac_dim


@dataclass(frozen=True)
class RanpacHeadOptions(MomentOptions):
    """``dim``: projection size M (None → ``min(5000, 10·D)``); ``lambdas``: the ridge grid (one value →
    fixed λ); ``val_fraction``: share of samples in the validation fold that picks λ; plus the moment
    options every head has (``align``, ``drift``, ``covariance``: :class:`~.moments.MomentOptions`)."""

    dim: int | None = None
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim is not None:
            check_positive_int(
                "ranpac option 'dim'", self.dim, "use e.g. 5000, or leave it out for min(5000, 10·D)", MAX_RANPAC_DIM
            )
        lambdas = self.lambdas if isinstance(self.lambdas, (list, tuple)) else (self.lambdas,)
        values = tuple(_as_number(v) for v in lambdas)
        if not values or not all(is_finite(v) and v > 0 for v in values):
            raise ConfigError(
                f"ranpac option 'lambdas' must be a positive number or a non-empty list of positive numbers, got "
                f"{self.lambdas!r}; e.g. [1.0e-4, 1.0e-2, 1.0, 100.0], or leave it out for 1e-8 … 1e8"
            )
        object.__setattr__(self, "lambdas", tuple(sorted(set(values))))
        vf = self.val_fraction
        if not is_number(vf) or not 0 < vf < 1:
            raise ConfigError(
                f"ranpac option 'val_fraction' must be a number strictly between 0 and 1, got {vf!r}; e.g. 0.2"
            )
        object.__setattr__(self, "val_fraction", float(vf))


def _as_number(value: object) -> float | None:
    """A lambda as a float, or None if it is none: YAML 1.1 reads 1e-3 (no dot) as a string, so a string
    that is plainly a number is one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return float(value) if is_number(value) else None


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
        if not is_int(seed):
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
