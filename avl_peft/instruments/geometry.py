"""Subspace geometry of the updates, on plain tensors: the study's instruments (formulas in docs/design.md).

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

Top-k bases use randomized SVD (``torch.svd_lowrank``, q = k + oversampling, 2 power iterations) unless
``exact=True``; everything is computed in float32 (CKA in float64) without gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..validate import is_int

OVERSAMPLE = 8  # extra random directions for svd_lowrank: a few make the top-k accurate with 2 iterations
NITER = 2
_EPS = 1e-12


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


def check_k(k: Any) -> int:
    if not is_int(k) or k < 1:
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
    k = check_k(k)
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
    return stable_rank_from(float(m.pow(2).sum()), float(torch.linalg.matrix_norm(m, ord=2)))


def stable_rank_from(fro2: float, sigma1: float) -> float:
    """‖M‖²_F / σ₁² from the two numbers (a caller that already has σ₁ from an SVD); 0 for M = 0."""
    return fro2 / sigma1**2 if sigma1 > 0.0 else 0.0


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


def principal_energy_in(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
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
    return principal_energy_in(delta, U, V)
