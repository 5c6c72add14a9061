"""A layer's frozen branches folded into terms whose size does not grow with the stream (``policy: stack``).

Under ``policy: stack`` experience t's branch freezes when experience t + 1 starts. Its weights never
train again, so what later experiences need of it is not the branch but a few sums
(docs/design.md, "Folding stacked branches"):

* **the update** Σ_i ΔW_i = Σ_i L_i R_i, kept as one low-rank pair (L (d_out, q), R (q, d_in)) while that is
  smaller than the dense matrix, q (d_out + d_in) < d_out d_in, and as the dense ΔW (d_out, d_in) from then
  on. The layer's forward adds the pair to its fused node's frozen term, or the dense ΔW to its weight.
* **O-LoRA's old input factors** (``interference: orthogonal``): Σ_i ‖R_i R_tᵀ‖²_F = ‖R_old R_tᵀ‖²_F with
  R_old the rows of every R_i stacked. Once R_old has more than d_in rows it is replaced by the triangular
  factor T of its QR decomposition R_old = Q T (Q orthonormal columns): ‖Q T v‖ = ‖T v‖ for every v, so
  the penalty is unchanged and R_old never exceeds d_in × d_in.
* **SD-LoRA's directions**, which cannot be summed because every magnitude α_i keeps learning: the unit
  directions B_i A_i / ‖B_i A_i‖_F as one stacked pair (B_cat (d_out, Σr) with B_i / ‖B_i A_i‖_F, A_cat
  (Σr, d_in)) and the magnitudes as one trainable vector α (t,), so
  Σ_i α_i B_i A_i / n_i = (B_cat diag(α ⊗ 1_r)) A_cat — one product instead of t, but its size grows by
  r (d_out + d_in) + 1 per experience: the method's math keeps every direction.

The GPM input basis (``interference: project``, InfLoRA) is already one orthonormal basis per layer, capped
by its energy threshold (``AdaptedLinear.memory``); each frozen branch's copy of it is no longer needed,
since the folded update was computed with the branch's confinement applied.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Frozen


def _empty(*shape: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(*shape, dtype=like.dtype, device=like.device)


def dense_is_cheaper(q: int, d_out: int, d_in: int) -> bool:
    """Whether a rank-q pair holds at least as many numbers as the dense d_out × d_in matrix."""
    return q * (d_out + d_in) >= d_out * d_in


class FoldedBranches(nn.Module):
    """Every frozen branch of one layer, folded (module docstring). ``count``: how many were folded."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        d_out, d_in = weight.shape
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=weight.device))
        self.register_buffer("left", _empty(d_out, 0, like=weight))
        self.register_buffer("right", _empty(0, d_in, like=weight))
        self.register_buffer("dense", _empty(0, d_in, like=weight))  # (d_out, d_in) once cheaper than the pair
        self.register_buffer("inputs", _empty(0, d_in, like=weight))  # O-LoRA: ≤ d_in rows
        self.register_buffer("dir_left", _empty(d_out, 0, like=weight))  # SD-LoRA: B_i / ‖B_i A_i‖_F
        self.register_buffer("dir_right", _empty(0, d_in, like=weight))  # SD-LoRA: A_i (confined)
        # SD-LoRA: α_i, trainable (an empty tensor has nothing to train: no optimizer state for other methods)
        self.magnitudes = nn.Parameter(_empty(0, like=weight), requires_grad=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    def add(self, branch: Adapter, weight: torch.Tensor) -> None:
        """Fold a frozen ``branch`` in (call after ``branch.freeze()``)."""
        d_out, d_in = self.shape
        with torch.no_grad():
            left, right, magnitude = branch.fold_parts(weight)
            left, right = left.detach().to(self.left.dtype), right.detach().to(self.left.dtype)
            if magnitude is not None:
                self.dir_left = torch.cat([self.dir_left, left], dim=1)
                self.dir_right = torch.cat([self.dir_right, right], dim=0)
                values = torch.cat([self.magnitudes.detach(), magnitude.detach().reshape(1).to(self.left.dtype)])
                self.magnitudes = nn.Parameter(values)
            elif self.dense.shape[0]:
                self.dense.addmm_(left, right)
            elif dense_is_cheaper(self.left.shape[1] + left.shape[1], d_out, d_in):
                self.dense = torch.addmm(left @ right, self.left, self.right)
                self.left, self.right = self.left[:, :0].clone(), self.right[:0].clone()
            else:
                self.left = torch.cat([self.left, left], dim=1)
                self.right = torch.cat([self.right, right], dim=0)
            if branch.opts.interference == "orthogonal":
                rows = torch.cat([self.inputs, branch.input_factor().detach().to(self.inputs.dtype)], dim=0)
                if rows.shape[0] > d_in:  # keep the triangular factor: same ‖rows · v‖ for every v
                    rows = torch.linalg.qr(rows.double(), mode="r").R.to(rows.dtype)
                self.inputs = rows
            self.count += 1

    def term(self) -> Frozen:
        """The folded update for the fused forward: a pair (L, R), a dense ΔW, or None (nothing folded)."""
        if not self.magnitudes.numel():  # a constant: hand out the stored tensors, no per-call product or copy
            if self.dense.shape[0]:
                return self.dense
            return (self.left, self.right) if self.left.shape[1] else None
        d_out, d_in = self.shape
        r = self.dir_left.shape[1] // self.magnitudes.numel()
        left, right = self.dir_left * self.magnitudes.repeat_interleave(r), self.dir_right
        if self.left.shape[1]:  # never for one method's branches; kept so any mix stays exact
            left, right = torch.cat([self.left, left], dim=1), torch.cat([self.right, right], dim=0)
        if self.dense.shape[0]:
            return self.dense + left @ right
        return left @ right if dense_is_cheaper(left.shape[1], d_out, d_in) else (left, right)

    def delta_weight(self) -> torch.Tensor:
        """The dense sum of the folded branches' ΔW (d_out, d_in)."""
        term = self.term()
        if term is None:
            return self.left.new_zeros(self.shape)
        return term if isinstance(term, torch.Tensor) else term[0] @ term[1]

    def resize(self, name: str, shape: torch.Size) -> None:
        """Give tensor ``name`` the saved ``shape`` before a state is loaded into it (restore)."""
        current = getattr(self, name)
        if current.shape == shape:
            return
        fresh = torch.empty(shape, dtype=current.dtype, device=current.device)
        if isinstance(current, nn.Parameter):
            self.magnitudes = nn.Parameter(fresh, requires_grad=fresh.numel() > 0)
        else:
            self._buffers[name] = fresh
