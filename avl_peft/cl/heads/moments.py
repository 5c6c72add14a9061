r"""Per-class Gaussian moments of the features: the one store behind classifier alignment and drift compensation.

Why. Once an adapter trains, the features of old classes move while their stored statistics do not
(``benchmarks/study/README.md``: a RanPAC head falls from 95 % on the frozen backbone to 30–42 % on adapted
ones). Two remedies from the literature work on the same stored moments:

**Moments.** When an experience ends, every class c in its training data gets, from the features
``f ∈ R^D`` of the backbone as it is then (float64 arithmetic):

- the count ``n_c`` and mean ``μ_c`` (float64, (K, D));
- the scatter about the mean ``S_c = Σ_i (f_i − μ_c)(f_i − μ_c)ᵀ``, so ``Σ_c = S_c / (n_c − 1)``. Stored
  ``full`` ((K, D, D) float32, SLCA's form) or ``lowrank`` (``S_c ≈ L_c L_cᵀ + diag(d_c)``: the top-``rank``
  singular directions of the centred features, L_c (K, D, rank), and the exact diagonal of what they leave
  out, d_c (K, D); both float32).

A class that comes back in a later experience is merged with the parallel-variance rule
``S = S_a + S_b + δδᵀ n_a n_b / n`` (δ = μ_b − μ_a): exact for ``full``; for ``lowrank`` the new factor is
the top-``rank`` SVD of ``[L_a, centred new features, δ √(n_a n_b / n)]`` and every discarded direction's
energy goes to the diagonal, so ``diag(S)`` stays exact.

Memory (:meth:`ClassMoments.nbytes`), K classes, D features: ``full`` K·D²·4 + K·D·8 + K·8 bytes —
473.1 MB at ViT-B/16 width (D = 768) and K = 200 (ImageNet-R); ``lowrank`` K·D·(rank+1)·4 + K·D·8 + K·8 —
41.2 MB at rank 64 and 11.7 MB at rank 16 (tests/test_alignment.py checks these bounds on a 768-wide stream).

**Sampling.** ``x = μ_c + C_c z``, z ~ N(0, I), from ``Σ_c + ε I`` with ``ε = shrink · tr(Σ_c) / D`` (a
relative jitter so a class with fewer samples than D is still positive definite): ``full`` uses the
Cholesky factor C_c; ``lowrank`` uses ``x = μ_c + L_c z₁/√(n_c−1) + √(d_c/(n_c−1) + ε) ⊙ z₂``. Draws come
from a generator seeded by (run seed, experience index), never the global RNG.

**Classifier alignment** (SLCA, Zhang et al., ICCV 2023, §"Classifier Alignment"): after each experience
the linear head is trained for ``epochs`` epochs on ``samples_per_class`` features drawn from every seen
class's Gaussian, with cross-entropy over all seen classes (SGD, ``lr``, momentum 0.9, mini-batches of
``batch_size``) and, as in SLCA, logit normalisation (``logit_norm`` τ: logits / (τ ‖logits‖); null: plain
logits). Defaults: 5 epochs and 256 samples per class (SLCA's), τ = 0.1 (SLCA's), lr 0.01.

**Drift compensation** (SDC, Yu et al., CVPR 2020, "Semantic Drift Compensation"): with ``f⁰_i``/``f¹_i``
the current experience's training features before/after it trains and δ_i = f¹_i − f⁰_i,

    Δ_c = Σ_i w_ic δ_i / Σ_i w_ic,   w_ic = exp(−‖f⁰_i − μ_c‖² / (2σ²)),   μ_c ← μ_c + Δ_c

for every class stored before the experience (weights normalised in log space, so no underflow). σ:
option ``sigma``; null (default) takes, per class, the median of ‖f⁰_i − μ_c‖ — SDC's σ = 0.3 assumed
L2-normalised embeddings, which these features are not. Covariances are left as they are: the displacement
field is estimated at a few points only, its Jacobian (what would move a covariance) is not.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...options import parse_options
from ...validate import check_int, check_number

COVARIANCES = ("full", "lowrank")


@dataclass(frozen=True)
class AlignOptions:
    """Classifier alignment (SLCA): see the module docstring for the recipe and where the defaults come from."""

    epochs: int = 5
    samples_per_class: int = 256
    lr: float = 0.01
    batch_size: int = 128
    shrink: float = 1e-4
    logit_norm: float | None = 0.1

    def __post_init__(self) -> None:
        check_int("align.epochs", self.epochs, minimum=1, maximum=10_000)
        check_int("align.samples_per_class", self.samples_per_class, minimum=1, maximum=1_000_000)
        check_int("align.batch_size", self.batch_size, minimum=1)
        check_number("align.lr", self.lr, low=0, exclusive_low=True)
        check_number("align.shrink", self.shrink, low=0)
        if self.logit_norm is not None:
            check_number("align.logit_norm", self.logit_norm, low=0, exclusive_low=True)


@dataclass(frozen=True)
class DriftOptions:
    """SDC drift compensation: ``sigma`` the Gaussian kernel width (null: per-class median distance)."""

    sigma: float | None = None

    def __post_init__(self) -> None:
        if self.sigma is not None:
            check_number("drift.sigma", self.sigma, low=0, exclusive_low=True)


def _section(cls: type, key: str, value: Any) -> Any:
    """``value`` → options of ``cls``: true → defaults, a mapping → those, null/false → None (off)."""
    if value is None or value is False:
        return None
    if isinstance(value, cls):
        return value
    if value is True:
        return cls()
    if isinstance(value, dict):
        return parse_options(cls, f"training.head_options.{key}", value)
    raise ConfigError(
        f"training.head_options.{key} must be true/false or a mapping of its options "
        f"({', '.join(f.name for f in dataclasses.fields(cls))}), got {value!r}"
    )


@dataclass(frozen=True)
class MomentOptions:
    """Options every head accepts: ``align`` (SLCA), ``drift`` (SDC: ``sdc`` or a mapping), and how class
    covariances are stored (``covariance``: full | lowrank, ``covariance_rank``). See :mod:`.moments`."""

    align: Any = None
    drift: Any = None
    covariance: str = "full"
    covariance_rank: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "align", _section(AlignOptions, "align", self.align))
        drift = {"sdc": True, "none": None}.get(self.drift, self.drift) if isinstance(self.drift, str) else self.drift
        if isinstance(drift, str):
            raise ConfigError(f"training.head_options.drift must be sdc, none or a mapping (sigma), got {drift!r}")
        object.__setattr__(self, "drift", _section(DriftOptions, "drift", drift))
        if self.covariance not in COVARIANCES:
            raise ConfigError(f"covariance must be one of {', '.join(COVARIANCES)}, got {self.covariance!r}")
        check_int("covariance_rank", self.covariance_rank, minimum=1, maximum=100_000)

    @property
    def uses_moments(self) -> bool:
        return self.align is not None or self.drift is not None


class ClassMoments:
    """Per-class count, mean and scatter of features (module docstring). ``state_dict`` is plain tensors."""

    def __init__(self, feature_dim: int, covariance: str = "full", rank: int = 64):
        self.feature_dim = check_int("feature_dim", feature_dim, minimum=1)
        if covariance not in COVARIANCES:
            raise ConfigError(f"covariance must be one of {', '.join(COVARIANCES)}, got {covariance!r}")
        self.covariance = covariance
        self.rank = min(check_int("covariance_rank", rank, minimum=1), self.feature_dim)
        d = self.feature_dim
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.means = torch.zeros(0, d, dtype=torch.float64)
        self.lowrank = covariance == "lowrank"
        if not self.lowrank:
            self.scatter = torch.zeros(0, d, d, dtype=torch.float32)
        else:
            self.factors = torch.zeros(0, d, self.rank, dtype=torch.float32)
            self.diag = torch.zeros(0, d, dtype=torch.float32)

    # -- bookkeeping -------------------------------------------------------------------------------------

    @property
    def n_classes(self) -> int:
        return int(self.counts.numel())

    @property
    def seen_classes(self) -> list[int]:
        return [int(c) for c in torch.nonzero(self.counts > 0).flatten()]

    def _tensors(self) -> tuple[str, ...]:
        return ("counts", "means", "factors", "diag") if self.lowrank else ("counts", "means", "scatter")

    def _grow(self, width: int) -> None:
        extra = width - self.n_classes
        if extra <= 0:
            return
        for name in self._tensors():
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros(extra, *t.shape[1:])]))

    def nbytes(self) -> int:
        """Bytes held by the stored statistics."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._tensors())

    @staticmethod
    def expected_nbytes(n_classes: int, feature_dim: int, covariance: str = "full", rank: int = 64) -> int:
        """:meth:`nbytes` for ``n_classes`` classes, by formula (module docstring)."""
        per_class = 8 + 8 * feature_dim
        if covariance == "lowrank":
            per_class += 4 * feature_dim * (min(rank, feature_dim) + 1)
        else:
            per_class += 4 * feature_dim * feature_dim
        return n_classes * per_class

    # -- accumulating -------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add an experience's features (N, D) with integer labels (N,); classes seen before are merged."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ConfigError(f"moments expect features (N, {self.feature_dim}), got {tuple(features.shape)}")
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if labels.numel() == 0:
            return
        self._grow(int(labels.max()) + 1)
        x = features.detach().double().cpu()
        for c in torch.unique(labels).tolist():
            self._merge(c, x[labels == c])

    def _merge(self, c: int, x: Tensor) -> None:
        n_b = x.shape[0]
        mu_b = x.mean(0)
        xc = x - mu_b
        n_a = int(self.counts[c])
        n = n_a + n_b
        delta = mu_b - self.means[c]
        w = n_a * n_b / n  # the merge term's weight: 0 for a class seen for the first time
        if not self.lowrank:
            self.scatter[c] = (self.scatter[c].double() + xc.T @ xc + w * torch.outer(delta, delta)).float()
        else:
            cols = [self.factors[c].double(), xc.T, (math.sqrt(w) * delta)[:, None]]
            m = torch.cat(cols, dim=1)  # (D, rank + n_b + 1): S_new − diag_a = m mᵀ
            u, s, _ = torch.linalg.svd(m, full_matrices=False)
            k = min(self.rank, s.numel())
            kept = u[:, :k] * s[:k]
            left = (m * m).sum(1) - (kept * kept).sum(1)  # diagonal energy of the discarded directions
            factor = torch.zeros(self.feature_dim, self.rank, dtype=torch.float64)
            factor[:, :k] = kept
            self.factors[c] = factor.float()
            self.diag[c] = (self.diag[c].double() + left.clamp_min(0)).float()
        self.means[c] = self.means[c] + delta * (n_b / n)
        self.counts[c] = n

    def covariance_matrix(self, c: int) -> Tensor:
        """Σ_c (D, D) float64 (the low-rank form expanded): scatter / (n_c − 1); zero for n_c ≤ 1."""
        n = int(self.counts[c])
        if not self.lowrank:
            s = self.scatter[c].double()
        else:
            f = self.factors[c].double()
            s = f @ f.T + torch.diag(self.diag[c].double())
        return s / (n - 1) if n > 1 else torch.zeros_like(s)

    # -- drift compensation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def compensate(self, before: Tensor, after: Tensor, sigma: float | None = None) -> Tensor:
        """SDC: move every stored mean by the kernel-weighted mean displacement of the current data.

        ``before``/``after``: the same samples' features (N, D) before and after the experience trained.
        Returns the (K, D) shifts applied (zero rows for classes not stored).
        """
        if before.shape != after.shape or before.dim() != 2 or before.shape[1] != self.feature_dim:
            raise ConfigError(
                f"drift compensation needs before/after features of the same shape (N, {self.feature_dim}), got "
                f"{tuple(before.shape)} and {tuple(after.shape)}"
            )
        shifts = torch.zeros_like(self.means)
        seen = self.seen_classes
        if not seen or before.shape[0] == 0:
            return shifts
        f0, delta = before.double().cpu(), (after.double() - before.double()).cpu()
        d2 = torch.cdist(self.means[seen], f0).pow(2)  # (|seen|, N)
        if sigma is None:
            scale2 = d2.sqrt().median(dim=1).values.clamp_min(1e-12).pow(2)[:, None]
        else:
            scale2 = torch.full((len(seen), 1), float(sigma) ** 2, dtype=torch.float64)
        weights = torch.softmax(-d2 / (2 * scale2), dim=1)  # Σ_i w_ic = 1, computed in log space
        shifts[seen] = weights @ delta
        self.means += shifts
        return shifts

    # -- sampling --------------------------------------------------------------------------------------------

    def sample(self, c: int, n: int, shrink: float, generator: torch.Generator) -> Tensor:
        """``n`` features (n, D) float32 drawn from N(μ_c, Σ_c + εI) (module docstring)."""
        d = self.feature_dim
        count = int(self.counts[c])
        z = torch.randn(n, d, generator=generator, dtype=torch.float64)
        mu = self.means[c]
        if not self.lowrank:
            cov = self.covariance_matrix(c)
            eps = shrink * float(torch.diagonal(cov).sum()) / d
            chol, info = torch.linalg.cholesky_ex(cov + eps * torch.eye(d, dtype=torch.float64))
            if int(info) != 0:  # not positive definite even with the jitter: the eigen square root
                vals, vecs = torch.linalg.eigh(cov)
                chol = vecs * (vals.clamp_min(0) + eps).sqrt()
            return (mu + z @ chol.T).float()
        norm = 1.0 / math.sqrt(count - 1) if count > 1 else 0.0
        f, diag = self.factors[c].double() * norm, self.diag[c].double() * norm**2
        eps = shrink * float((f * f).sum() + diag.sum()) / d
        z1 = torch.randn(n, self.rank, generator=generator, dtype=torch.float64)
        return (mu + z1 @ f.T + z * (diag + eps).sqrt()).float()

    def pseudo_features(self, per_class: int, shrink: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(features (K_seen·per_class, D), labels): ``per_class`` draws from every seen class, class by class."""
        seen = self.seen_classes
        feats = [self.sample(c, per_class, shrink, generator) for c in seen]
        labels = torch.tensor(seen, dtype=torch.int64).repeat_interleave(per_class)
        return (torch.cat(feats) if feats else torch.zeros(0, self.feature_dim)), labels

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"covariance": self.covariance, "rank": self.rank, "feature_dim": self.feature_dim}
        for name in self._tensors():
            state[name] = getattr(self, name).detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("covariance", "rank", "feature_dim"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"saved class moments have {key}={state.get(key)!r}, these {getattr(self, key)!r}; "
                    "resume with the head options of the saved run"
                )
        for name in self._tensors():
            setattr(self, name, state[name].clone())


def align_linear(
    head: nn.Module, moments: ClassMoments, opts: AlignOptions, generator: torch.Generator, device: torch.device | str
) -> float:
    """SLCA's classifier alignment of ``head`` (features → logits) on pseudo-features; the last epoch's mean loss.

    Samples are drawn once (``samples_per_class`` per seen class) and shuffled each epoch with ``generator``.
    Only the head's own parameters change; its ``requires_grad`` flags and train/eval mode are restored.
    """
    feats, labels = moments.pseudo_features(opts.samples_per_class, opts.shrink, generator)
    if feats.shape[0] == 0:
        return float("nan")
    params = [p for p in head.parameters()]
    flags = [p.requires_grad for p in params]
    mode = head.training
    dtype = params[0].dtype if params else torch.float32
    # Cross-entropy over the seen classes only: the head's other units (an IncrementalClassifier masks them
    # with a constant) would otherwise dominate the logit norm.
    seen = torch.tensor(moments.seen_classes, dtype=torch.int64)
    position = torch.full((moments.n_classes,), -1, dtype=torch.int64)
    position[seen] = torch.arange(seen.numel())
    feats, labels = feats.to(device=device, dtype=dtype), position[labels].to(device)
    seen = seen.to(device)
    optimizer = torch.optim.SGD(params, lr=opts.lr, momentum=0.9)
    last = float("nan")
    try:
        for p in params:
            p.requires_grad_(True)
        head.train()
        with torch.enable_grad():
            for _ in range(opts.epochs):
                order = torch.randperm(feats.shape[0], generator=generator).to(device)
                total, batches = 0.0, 0
                for start in range(0, feats.shape[0], opts.batch_size):
                    idx = order[start : start + opts.batch_size]
                    logits = head(feats[idx])[:, seen]
                    if opts.logit_norm is not None:
                        logits = logits / (opts.logit_norm * logits.norm(dim=1, keepdim=True).clamp_min(1e-7))
                    loss = F.cross_entropy(logits, labels[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total, batches = total + float(loss.detach()), batches + 1
                last = total / max(batches, 1)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
        head.train(mode)
    return last
