"""Subspace geometry of the updates: the study's instruments (SPEC §4).

Notation: a target layer's pretrained weight is W₀ ∈ R^{d_out×d_in}; after training experience t its
effective weight is W_t = (current base weight) + ΔW (ΔW = 0 where no adapter is attached). So the
**cumulative update** is C_t = W_t − W₀ — one definition for every case: ``policy: continue`` (C_t = ΔW),
``policy: merge`` (earlier updates already folded into the base weight) and full fine-tuning (the base
weight itself changed). The **increment** of experience t is I_t = C_t − C_{t−1} (C_{−1} = 0).

For a matrix M, U_k(M) is an orthonormal basis (d_out × k) of its top-k left singular vectors
(the column space the update writes into).

- **principal overlap** of two subspaces with orthonormal bases U₁ (d×k₁), U₂ (d×k₂): the mean cos² of
  their principal angles θᵢ,
      overlap(U₁, U₂) = (1/min(k₁,k₂)) Σᵢ cos² θᵢ = ‖U₁ᵀU₂‖²_F / min(k₁, k₂)   ∈ [0, 1]
  (1: one subspace contains the other; 0: orthogonal; 0 by convention when either is empty).
- **overlap** (experience t ≥ 1): overlap(U_k(I_t), orth[U_k(I_0), …, U_k(I_{t−1})]) — how much this
  experience's update writes into the directions earlier experiences' updates used (experience 0: null).
- **alignment**: overlap(U_k(C_t), U_k(W₀)) — how much the cumulative update writes into the pretrained
  weight's principal (top-k) output directions. Chance level for a random update is ≈ k/d_out.
- **principal energy** (two-sided companion of alignment): 1 − ‖(I − U_kU_kᵀ) C_t (I − V_kV_kᵀ)‖²_F / ‖C_t‖²_F
  with U_k, V_k W₀'s top-k left/right singular vectors — the share of the update touching W₀'s
  principal directions on either side (PiSSA's gradient steps are half left-, half right-aligned, so
  its left-only alignment is ≈ 1/2 while this is ≈ 1; chance ≈ k/d_out + k/d_in).
- **effective rank** (stable rank): srank(M) = ‖M‖²_F / ‖M‖²₂ ∈ [1, rank M] (0 for M = 0), of C_t.
- **relative norm**: ‖C_t‖_F / ‖W₀‖_F.
- **feature drift**: 1 − CKA(F₀, F_t) with linear CKA on a fixed probe batch, F = backbone features
  (n × d), centred (H = I − 11ᵀ/n):
      CKA(X, Y) = ‖YᵀHX‖²_F / (‖XᵀHX‖_F ‖YᵀHY‖_F)   ∈ [0, 1]
  invariant to orthogonal transforms and isotropic scaling of either feature set.

Per layer values are also averaged over layers (a layer whose overlap is undefined is left out of that
mean). Top-k bases use randomized SVD (``torch.svd_lowrank``, q = k + oversampling, 2 power iterations)
unless ``exact=True``; all geometry is computed in float32 without gradients.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from .adapters import AdaptedLinear
from .errors import ConfigError
from .peft import DEFAULT_TARGETS, _matches, head_names

OVERSAMPLE = 8  # extra random directions for svd_lowrank: a few make the top-k accurate with 2 iterations
NITER = 2
_EPS = 1e-12

# Layer-averaged values in every record (and TensorBoard tags subspace/<name>).
METRICS = ("overlap", "alignment", "principal_energy", "effective_rank", "relative_norm", "feature_drift")
LAYER_METRICS = METRICS[:-1]


# --------------------------------------------------------------------------------------------------
# Instruments on plain tensors
# --------------------------------------------------------------------------------------------------


def principal_overlap(U1: torch.Tensor, U2: torch.Tensor) -> float:
    """Mean cos² of the principal angles between span(U1) and span(U2) (orthonormal column bases).

    ``‖U1ᵀU2‖²_F / min(k1, k2)``; 0.0 when either basis has no columns.
    """
    if U1.dim() != 2 or U2.dim() != 2 or U1.shape[0] != U2.shape[0]:
        raise ValueError(f"bases must be (d × k) with the same d, got {tuple(U1.shape)} and {tuple(U2.shape)}")
    k = min(U1.shape[1], U2.shape[1])
    if k == 0:
        return 0.0
    m = U1.detach().double().t() @ U2.detach().double()
    return float(min(1.0, max(0.0, (m.pow(2).sum() / k).item())))


def _numerical_rank_cut(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many singular values are above the usual numerical-rank tolerance."""
    if s.numel() == 0 or s[0] <= 0:
        return 0
    tol = s[0] * max(shape) * torch.finfo(s.dtype).eps
    return int((s > tol).sum())


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return k


def top_singular(M: torch.Tensor, k: int, *, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, V): M's top-k' singular triplets, k' = min(k, numerical rank of M), in float32.

    U is d_out × k', V is d_in × k' (both orthonormal columns), s descending. Randomized
    (``torch.svd_lowrank``, q = k + oversampling, 2 power iterations) by default; exact
    ``torch.linalg.svd`` with ``exact=True`` or when q would reach min(d_out, d_in) anyway. A zero (or
    non-finite) matrix gives empty factors.
    """
    if M.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(M.shape)}")
    k = _check_k(k)
    m = M.detach().float()
    d_out, d_in = m.shape
    k = min(k, d_out, d_in)
    peak = float(m.abs().amax()) if m.numel() else 0.0  # NaN propagates: one pass checks both
    if k == 0 or not math.isfinite(peak) or peak == 0.0:
        return m.new_zeros(d_out, 0), m.new_zeros(0), m.new_zeros(d_in, 0)
    q = min(k + OVERSAMPLE, d_out, d_in)
    if exact or q >= min(d_out, d_in):  # randomized SVD buys nothing when q reaches the full rank
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        v = vh.t()
    else:
        u, s, v = torch.svd_lowrank(m, q=q, niter=NITER)
    k = min(k, _numerical_rank_cut(s, (d_out, d_in)))
    return u[:, :k].contiguous(), s[:k].contiguous(), v[:, :k].contiguous()


def top_left_singular(M: torch.Tensor, k: int, *, exact: bool = False) -> torch.Tensor:
    """Orthonormal basis (d_out × k') of M's top-k left singular vectors, k' = min(k, rank M).

    Randomized (``torch.svd_lowrank``, q = k + oversampling, 2 power iterations) by default, exact
    ``torch.linalg.svd`` with ``exact=True``. A zero matrix gives an empty (d_out × 0) basis.
    """
    return top_singular(M, k, exact=exact)[0]


def orthonormalize(bases: Iterable[torch.Tensor]) -> torch.Tensor:
    """An orthonormal basis of the span of several bases' columns (numerically dependent ones dropped)."""
    bases = [b for b in bases]
    if not bases:
        raise ValueError("orthonormalize needs at least one basis")
    cat = torch.cat([b.float() for b in bases], dim=1)
    if cat.shape[1] == 0:
        return cat
    u, s, _ = torch.linalg.svd(cat, full_matrices=False)
    keep = int((s > max(cat.shape) * torch.finfo(s.dtype).eps * max(float(s[0]), 1.0)).sum())
    return u[:, :keep].contiguous()


def alignment(delta: torch.Tensor, W: torch.Tensor, k: int, *, exact: bool = False) -> float:
    """Overlap of ΔW's top-k left singular subspace with W's top-k left singular subspace."""
    if delta.shape != W.shape:
        raise ValueError(f"ΔW {tuple(delta.shape)} and W {tuple(W.shape)} must have the same shape")
    return principal_overlap(top_left_singular(delta, k, exact=exact), top_left_singular(W, k, exact=exact))


def stable_rank(M: torch.Tensor) -> float:
    """‖M‖²_F / ‖M‖²₂ (the effective rank: 1 for rank-1, n for an n×n identity); 0 for M = 0."""
    m = M.detach().float()
    if m.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(m.shape)}")
    if m.numel() == 0:
        return 0.0
    spec = float(torch.linalg.matrix_norm(m, ord=2))
    if spec == 0.0:
        return 0.0
    return float(m.pow(2).sum()) / spec**2


def relative_norm(delta: torch.Tensor, W: torch.Tensor) -> float:
    """‖ΔW‖_F / ‖W‖_F (0 when W is zero and ΔW too; inf when only W is zero)."""
    d = float(delta.detach().float().norm())
    w = float(W.detach().float().norm())
    if w == 0.0:
        return 0.0 if d == 0.0 else math.inf
    return d / w


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA between feature matrices X (n × d1) and Y (n × d2), each column-centred.

    1 for identical features (and for features related by an orthogonal map times a scalar); computed
    in float64. 0.0 if either set is constant across the n samples.
    """
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"features must be (n × d) with the same n, got {tuple(X.shape)} and {tuple(Y.shape)}")
    x = X.detach().double()
    y = Y.detach().double()
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    # With n < d, the n×n Gram form is cheaper: ‖YᵀX‖²_F = ⟨XXᵀ, YYᵀ⟩.
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.t(), y @ y.t()
        num, den = (kx * ky).sum(), kx.norm() * ky.norm()
    else:
        num = (y.t() @ x).pow(2).sum()
        den = (x.t() @ x).norm() * (y.t() @ y).norm()
    if float(den) <= _EPS * _EPS:
        return 0.0
    return float(min(1.0, max(0.0, (num / den).item())))


def feature_drift(X: torch.Tensor, Y: torch.Tensor) -> float:
    """1 − linear CKA(X, Y)."""
    return 1.0 - linear_cka(X, Y)


def _principal_energy(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    d = delta.detach().float()
    total = float(d.pow(2).sum())
    if total == 0.0:
        return 0.0
    r = d - U @ (U.t() @ d)  # leave W's top-k output directions …
    r = r - (r @ V) @ V.t()  # … and its top-k input directions
    return float(min(1.0, max(0.0, 1.0 - float(r.pow(2).sum()) / total)))


def principal_energy(delta: torch.Tensor, W: torch.Tensor, k: int, *, exact: bool = False) -> float:
    """Share of ΔW's energy that touches W's top-k singular directions (on either side):

        1 − ‖(I − U_kU_kᵀ) ΔW (I − V_kV_kᵀ)‖²_F / ‖ΔW‖²_F   ∈ [0, 1]   (0 for ΔW = 0)

    with U_k, V_k W's top-k left/right singular vectors. Two-sided, unlike :func:`alignment`: a PiSSA
    gradient step is ΔW ≈ −η(G V_r S_r V_rᵀ + U_r S_r U_rᵀ G) — half of it is left-aligned, half
    right-aligned — so its left-only alignment sits near 1/2 while this is ≈ 1. Chance level for a
    random ΔW is ≈ k/d_out + k/d_in.
    """
    if delta.shape != W.shape:
        raise ValueError(f"ΔW {tuple(delta.shape)} and W {tuple(W.shape)} must have the same shape")
    U, _, V = top_singular(W, k, exact=exact)
    return _principal_energy(delta, U, V)


# --------------------------------------------------------------------------------------------------
# The Avalanche plugin
# --------------------------------------------------------------------------------------------------


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """(base weight + ΔW) of an adapted layer, the weight of a plain Linear; float32, no grad."""
    if isinstance(module, AdaptedLinear):
        return module.base.weight.detach().float() + module.delta_weight().detach().float()
    return module.weight.detach().float()


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class _Layer:
    """What the tracker keeps per layer: W₀ (and its top-k bases), C_{t−1}, the span of increments."""

    __slots__ = ("w0", "w0_norm", "u0", "v0", "prev", "span")

    def __init__(self, w0: torch.Tensor):
        self.w0 = w0
        self.w0_norm = float(w0.norm())
        self.u0: torch.Tensor | None = None
        self.v0: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None  # cumulative update after the previous experience
        self.span: torch.Tensor | None = None  # orthonormal basis of earlier increments' top-k spans


@contextlib.contextmanager
def _own_rng():
    """Randomized SVD draws from torch's RNG: measure on a forked, fixed-seed RNG so the instrument never
    shifts the training's random stream (data order, head growth) and its own numbers are reproducible."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


class SubspaceTracker(SupervisedPlugin, supports_distributed=True):
    """Measures the geometry of the updates after every training experience (formulas: module docstring).

    Add it to any strategy next to :class:`~avl_peft.plugin.PEFTPlugin` (any order)::

        tracker = SubspaceTracker(probe_images, k=8)
        strategy.plugins.append(tracker)   # or plugins=[peft, tracker, ...] at construction
        ...train...
        tracker.records  # one dict per training experience

    :param probe: a fixed batch of inputs (n × C × H × W, n ≥ 2) for feature drift; features are
        ``model.backbone(probe)`` (the model itself when it has no ``backbone``), in eval mode.
    :param k: size of the top-k subspaces (clamped to each matrix's rank).
    :param exact: exact SVD instead of randomized ``torch.svd_lowrank`` (slower on large layers).
    :param writer: where the layer-averaged values go as ``subspace/<metric>`` scalars, step = experience:
        ``"auto"`` (default) uses the writer of a ``TensorboardLogger`` in the strategy's evaluator if
        there is one; ``None`` logs nothing; or any object with ``add_scalar(tag, value, step)``.
    :param targets: module-name suffixes/regexes of the layers to track; default: the targets of a
        ``PEFTPlugin`` in the strategy, else every linear layer in the blocks. The head is never tracked.
    :param rebase_after_base_session: with a ``PEFTPlugin(pretrain=True)`` (B-N protocol), take the
        weights and features after the full-fine-tuning base session (experience 0) as the reference
        for every later experience, so the adapter's geometry is measured against the backbone it
        adapts. Experience 0's record (``"base_session": true``) is measured against the start.

    The reference W₀ and probe features are taken at the first ``before_training`` the plugin sees —
    before ``PEFTPlugin`` injects anything (injection never changes the base weights anyway). Memory:
    two float32 copies of every tracked weight (W₀ and the previous cumulative update).

    ``records``: one dict per training experience, JSON-ready —
    ``{"experience": t, "overlap": float | None (None at the first experience), "alignment",
    "principal_energy", "effective_rank", "relative_norm", "feature_drift": float,
    "layers": {module name: {the five per-layer values}}}`` plus ``"base_session": True`` on a base
    session's record. ``seconds``: wall time the tracker has spent.
    """

    def __init__(
        self,
        probe: torch.Tensor,
        k: int = 8,
        exact: bool = False,
        *,
        writer: Any = "auto",
        targets: list[str] | tuple[str, ...] | None = None,
        rebase_after_base_session: bool = True,
    ):
        super().__init__()
        if not isinstance(probe, torch.Tensor) or probe.dim() < 2 or probe.shape[0] < 2:
            shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
            raise ConfigError(f"probe must be a batch tensor with at least 2 samples, got {shape}")
        try:
            self.k = _check_k(k)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if writer not in ("auto", None) and not callable(getattr(writer, "add_scalar", None)):
            raise ConfigError("writer must be 'auto', None or an object with add_scalar(tag, value, step)")
        if targets is not None and (not targets or not all(isinstance(t, str) and t for t in targets)):
            raise ConfigError(f"targets must be a non-empty list of module-name suffixes or regexes, got {targets!r}")
        self.probe = probe.detach().cpu()
        self.exact = bool(exact)
        self.writer = writer
        self.targets = list(targets) if targets is not None else None
        self.rebase_after_base_session = bool(rebase_after_base_session)
        self.records: list[dict[str, Any]] = []
        self.seconds = 0.0  # wall time spent measuring (snapshots included)
        self._layers: dict[str, _Layer] | None = None
        self._features0: torch.Tensor | None = None

    # --- helpers ------------------------------------------------------------------------------------

    @staticmethod
    def _peft_plugin(strategy: Any) -> Any:
        from .plugin import PEFTPlugin

        return next((p for p in getattr(strategy, "plugins", []) if isinstance(p, PEFTPlugin)), None)

    def _layer_names(self, strategy: Any) -> list[str]:
        model = strategy.model
        targets = self.targets
        if targets is None:
            peft = self._peft_plugin(strategy)
            targets = getattr(peft, "targets", None)
        targets = list(DEFAULT_TARGETS if targets is None else targets)
        heads = head_names(model)
        names = []
        for name, mod in model.named_modules():
            if not name or not isinstance(mod, (nn.Linear, AdaptedLinear)):
                continue
            if any(name == h or name.startswith(h + ".") for h in heads):
                continue
            if name.endswith(".base") and isinstance(model.get_submodule(name[: -len(".base")]), AdaptedLinear):
                continue  # the Linear inside an AdaptedLinear: tracked under the wrapper's name
            if any(_matches(name, t) for t in targets):
                names.append(name)
        if not names:
            raise ConfigError(
                f"SubspaceTracker: targets {targets} match no linear layer of {type(model).__name__} outside its head"
            )
        return names

    def _features(self, strategy: Any) -> torch.Tensor:
        model = strategy.model
        net = getattr(model, "backbone", model)
        modes = {m: m.training for m in model.modules()}
        device = getattr(strategy, "device", None) or next(model.parameters()).device
        try:
            model.eval()
            with torch.no_grad():
                out = net(self.probe.to(device))
        finally:
            for m, mode in modes.items():
                m.training = mode
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().float().reshape(out.shape[0], -1)

    def _snapshot(self, strategy: Any) -> None:
        modules = dict(strategy.model.named_modules())
        self._layers = {name: _Layer(_effective_weight(modules[name]).clone()) for name in self._layer_names(strategy)}
        self._features0 = self._features(strategy)

    def _writer(self, strategy: Any) -> Any:
        if self.writer != "auto":
            return self.writer
        from avalanche.logging import TensorboardLogger

        for logger in getattr(getattr(strategy, "evaluator", None), "loggers", None) or []:
            if isinstance(logger, TensorboardLogger):
                return logger.writer
        return None

    # --- measurement --------------------------------------------------------------------------------

    def _measure_layer(self, layer: _Layer, weight: torch.Tensor, first: bool) -> dict[str, float | None]:
        k, exact = self.k, self.exact
        if layer.u0 is None:
            layer.u0, _, layer.v0 = top_singular(layer.w0, k, exact=exact)
        cum = weight - layer.w0
        inc = cum if layer.prev is None else cum - layer.prev
        u_cum, s_cum, _ = top_singular(cum, k, exact=exact)
        u_inc = u_cum if inc is cum else top_left_singular(inc, k, exact=exact)
        overlap = None
        if not first and layer.span is not None and layer.span.shape[1] and u_inc.shape[1]:
            overlap = principal_overlap(u_inc, layer.span)
        fro2 = float(cum.pow(2).sum())
        out = {
            "overlap": overlap,
            "alignment": principal_overlap(u_cum, layer.u0),
            "principal_energy": _principal_energy(cum, layer.u0, layer.v0),
            # σ₁ from the same (randomized) SVD: no second decomposition of C_t.
            "effective_rank": fro2 / float(s_cum[0]) ** 2 if s_cum.numel() else 0.0,
            "relative_norm": math.sqrt(fro2) / layer.w0_norm if layer.w0_norm > 0 else 0.0,
        }
        if u_inc.shape[1]:
            layer.span = u_inc if layer.span is None else orthonormalize([layer.span, u_inc])
        layer.prev = cum
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue measuring exactly (tensors, numbers, lists, dicts only)."""
        layers = None
        if self._layers is not None:
            layers = {
                name: {slot: getattr(layer, slot) for slot in _Layer.__slots__} for name, layer in self._layers.items()
            }
        return {"records": self.records, "seconds": self.seconds, "features0": self._features0, "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records, self.seconds, self._features0 = state["records"], state["seconds"], state["features0"]
        self._layers = None
        if state["layers"] is not None:
            self._layers = {}
            for name, slots in state["layers"].items():
                layer = _Layer.__new__(_Layer)
                for slot, value in slots.items():
                    setattr(layer, slot, value)
                self._layers[name] = layer

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        with _own_rng():
            self._before_training(strategy)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        with _own_rng():
            self._after_training_exp(strategy)

    def _before_training(self, strategy: Any) -> None:
        if self._layers is None:
            start = time.perf_counter()
            self._snapshot(strategy)
            self.seconds += time.perf_counter() - start

    def _after_training_exp(self, strategy: Any) -> None:
        start = time.perf_counter()
        if self._layers is None:  # trained without before_training (custom loop): measure from here on
            self._snapshot(strategy)
        t = len(self.records)
        modules = dict(strategy.model.named_modules())
        first = all(layer.prev is None for layer in self._layers.values())
        per_layer: dict[str, dict[str, float | None]] = {}
        with torch.no_grad():
            for name, layer in self._layers.items():
                if name not in modules:
                    continue  # the model lost this layer (replaced by hand): nothing to measure
                per_layer[name] = self._measure_layer(layer, _effective_weight(modules[name]), first)
            features = self._features(strategy)
        record: dict[str, Any] = {"experience": t}
        for metric in LAYER_METRICS:
            mean = _mean([v[metric] for v in per_layer.values()])
            record[metric] = mean if mean is not None or metric == "overlap" else 0.0
        record["feature_drift"] = feature_drift(self._features0, features)
        peft = self._peft_plugin(strategy)
        base_session = bool(getattr(peft, "pretrain", False)) and t == 0
        if base_session:
            record["base_session"] = True
        record["layers"] = per_layer
        self.records.append(record)

        writer = self._writer(strategy)
        if writer is not None:
            for metric in METRICS:
                if record[metric] is not None:
                    writer.add_scalar(f"subspace/{metric}", record[metric], t)
        if base_session and self.rebase_after_base_session:
            self._snapshot(strategy)  # the adapters now adapt the base-session backbone
        self.seconds += time.perf_counter() - start
