"""LoRETTA (Yang et al., NAACL 2024, "LoRETTA: Low-Rank Economic Tensor-Train Adaptation"), the
LoRETTA_rep variant: LoRA whose factors A (r × d_in) and B (d_out × r) are each stored as a tensor train.

A matrix with n entries is reshaped to a tensor of shape (n₁, …, n_k), Π nᵢ = n, held as cores
Gᵢ ∈ R^{t_{i−1} × nᵢ × t_i} with t₀ = t_k = 1 and inner TT-rank t; it costs Σ t_{i−1} nᵢ tᵢ parameters.
The reference hard-codes shapes per hidden size; here n is factorised automatically (see
:func:`tt_shape`), so any layer size works, including ones with a large prime factor.

    ΔW = s · B A,   A = reshape(TT(G^A), r × d_in),   B = reshape(TT(G^B), d_out × r),   s = α / r.

Init: Gaussian cores scaled so reconstructed entries have std ≈ √(1/(d_in+d_out)); the last core of B
is zero so ΔW = 0 at injection. ``init: reference`` keeps B non-zero (the original non-zero start).
Dense ΔW reconstructs A and B with tensorly (pytorch backend); the forward contracts the same cores with
plain matmuls (tested equal) and computes y = W x + b + s B (A x).
Interference: the input-side factor is the reconstructed A (r × d_in) — ΔW x depends on x only through
A x — so the orthogonal penalty compares reconstructed A's and ``project`` confines A to A (I − M Mᵀ).
"""

from __future__ import annotations

import dataclasses
import math

import tensorly as tl
import torch
from torch import nn

from ..errors import ConfigError
from ..validate import is_int
from ._lowrank import low_rank_linear
from .base import METHODS, Adapter, AdapterOptions, Frozen

MAX_FACTOR = 12  # moderate mode sizes: 768·8 = 6144 → (8, 8, 12, 8), the reference's shape


def _primes(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def tt_shape(n: int, max_factor: int = MAX_FACTOR) -> list[int]:
    """Factorise n into modes of moderate size (each ≤ max_factor unless n has a larger prime factor).

    Greedy: take prime factors largest first and multiply each into the smallest mode that stays within
    max_factor, else open a new mode. Deterministic, so a saved adapter reloads into the same shape.
    """
    if n < 1:
        raise ConfigError(f"cannot tensorise a matrix with {n} entries")
    modes: list[int] = []
    for p in sorted(_primes(n), reverse=True):
        fits = [i for i, m in enumerate(modes) if m * p <= max_factor]
        if fits:
            i = min(fits, key=lambda j: modes[j])
            modes[i] *= p
        else:
            modes.append(p)
    modes = sorted(modes)
    if len(modes) > 1:  # the reference's layout puts the largest mode second to last: 8·8·12·8
        modes.insert(len(modes) - 2, modes.pop())
    return modes or [1]


def tt_param_count(n: int, tt_rank: int) -> int:
    """Σ t_{i−1} nᵢ tᵢ for the automatic shape of n (t₀ = t_k = 1)."""
    shape = tt_shape(n)
    ranks = [1] + [tt_rank] * (len(shape) - 1) + [1]
    return sum(ranks[i] * m * ranks[i + 1] for i, m in enumerate(shape))


@dataclasses.dataclass
class LoRETTAOptions(AdapterOptions):
    tt_rank: int = 5  # inner TT-rank t; 5 gives ≈1.2k parameters per 768×768 matrix at r = 8
    init: str = "zero"  # "zero": ΔW = 0 at start (one core of B zero); "reference": original non-zero start

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.tt_rank) or self.tt_rank <= 0:
            raise ConfigError(f"tt_rank must be a positive integer, got {self.tt_rank!r}")
        if self.init not in ("zero", "reference"):
            raise ConfigError(f"init must be 'zero' or 'reference', got {self.init!r}")


class TensorTrain(nn.Module):
    """A (rows × cols) matrix stored as TT cores over the automatic shape of rows·cols."""

    def __init__(self, rows: int, cols: int, tt_rank: int, std: float, dtype, device, zero_last: bool):
        super().__init__()
        self.rows, self.cols = rows, cols
        shape = tt_shape(rows * cols)
        ranks = [1] + [tt_rank] * (len(shape) - 1) + [1]
        # Entry of the reconstruction = sum over Π t_i paths of k core-entry products, so with i.i.d.
        # N(0, σ²) cores its variance is t^{k−1} σ^{2k}; choose σ to hit the target std.
        k = len(shape)
        sigma = (std**2 / tt_rank ** (k - 1)) ** (1.0 / (2 * k))
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(ranks[i], m, ranks[i + 1], dtype=dtype, device=device) * sigma)
            for i, m in enumerate(shape)
        )
        if zero_last:
            with torch.no_grad():
                self.cores[-1].zero_()

    def matrix(self) -> torch.Tensor:
        """The reconstruction by tensorly (pytorch backend): the reference definition."""
        with tl.backend_context("pytorch"):
            full = tl.tt_to_tensor(list(self.cores))
        return full.reshape(self.rows, self.cols)

    def fast_matrix(self) -> torch.Tensor:
        """The same contraction as a chain of matmuls, for the per-step forward.

        tensorly's backend switch costs milliseconds per call (measured: ~7 ms with ``backend_context``
        vs ~0.14 ms here for a 8×768 factor), which would dominate a training step at ~100 layers.
        Tests tie it to :meth:`matrix`.
        """
        out = self.cores[0].reshape(-1, self.cores[0].shape[-1])  # (n₁, t₁)
        for core in self.cores[1:]:  # (n₁…nᵢ₋₁, tᵢ₋₁) @ (tᵢ₋₁, nᵢ·tᵢ) -> (n₁…nᵢ, tᵢ)
            out = (out @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
        return out.reshape(self.rows, self.cols)


TT_RANKS = tuple(range(2, 17))  # inner TT-ranks an equal-budget search tries (the paper uses single digits)
MAX_BUDGET_RANK = 64  # r only adds a small mode to the tensor train: beyond this the count barely changes


@METHODS.register("loretta", "LoRETTA: LoRA factors stored as tensor trains (Yang et al. 2024)")
class LoRETTA(Adapter):
    Options = LoRETTAOptions
    budget_knobs = ("rank", "tt_rank")
    # Not monotone: the tensor-train shape of r·d_in depends on r's prime factors, so every pair is counted.
    budget_monotone = False

    @classmethod
    def budget_candidates(cls, max_rank: int, fixed: dict) -> list[dict[str, int]]:
        ranks = [fixed["rank"]] if "rank" in fixed else range(1, min(max_rank, MAX_BUDGET_RANK) + 1)
        tts = [fixed["tt_rank"]] if "tt_rank" in fixed else TT_RANKS
        return [{"rank": r, "tt_rank": t} for r in ranks for t in tts]

    @staticmethod
    def closed_form_count(d_out: int, d_in: int, opts: LoRETTAOptions) -> int:
        # Two tensor trains: A (r × d_in) and B (d_out × r), over the same automatic shapes TensorTrain uses.
        return tt_param_count(opts.rank * d_in, opts.tt_rank) + tt_param_count(d_out * opts.rank, opts.tt_rank)

    def __init__(self, layer: nn.Linear, opts: LoRETTAOptions, shared: nn.Module | None = None):
        super().__init__(layer, opts)
        d_out, d_in = layer.weight.shape
        std = math.sqrt(1.0 / (d_in + d_out))
        kw = dict(dtype=layer.weight.dtype, device=layer.weight.device)
        self.tt_A = TensorTrain(opts.rank, d_in, opts.tt_rank, std, zero_last=False, **kw)
        self.tt_B = TensorTrain(d_out, opts.rank, opts.tt_rank, std, zero_last=opts.init == "zero", **kw)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.confine(self.scale * (self.tt_B.matrix() @ self.tt_A.matrix()))

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale * self.tt_B.fast_matrix(), self.confine(self.tt_A.fast_matrix())

    def input_factor(self) -> torch.Tensor:
        return self.tt_A.fast_matrix()

    def forward(self, x: torch.Tensor, layer: nn.Linear, frozen: Frozen = None) -> torch.Tensor:
        # (r, d_in), (d_out, r): tiny, rebuilt per step
        a, b = self.confine(self.tt_A.fast_matrix()), self.tt_B.fast_matrix()
        return low_rank_linear(x, layer.weight, layer.bias, a, b, self.scale, self.drop(x), frozen)
