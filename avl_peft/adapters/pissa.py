"""PiSSA (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation").

LoRA whose factors start as the principal rank-r part of the pretrained weight W = U S Vᵀ:
    B₀ = U_r S_r^{1/2} / √s   (d_out × r),   A₀ = S_r^{1/2} V_rᵀ / √s   (r × d_in),   s B₀ A₀ = U_r S_r V_rᵀ.
The reference implementation rewrites W to the residual W − s B₀A₀, which would silently change a shared
backbone. Here W stays untouched and frozen copies A₀, B₀ are kept (buffers), so
    ΔW = s (B A − B₀ A₀)   — zero at initialisation, and the same function as the reference.
Factored forward: y = (W − s B₀A₀) x + b + s · B (A x) — the low-rank node with −s·B₀A₀ as its frozen term
(gradients only for A, B; one GEMM with W − s·B₀A₀ + s·BA when that pays, see ``_lowrank``).

Confined (``interference: project``, basis M (d_in, k)): both terms are confined,
ΔW = s (B A − B₀ A₀)(I − M Mᵀ), so the branch's *total* update vanishes on span(M) and is still zero at
the start. Confining B A alone would break both: −s B₀ A₀ M Mᵀ would remain.
Input-side factor (orthogonal penalty): the trainable A (the constant −B₀A₀ term cannot move, so it would
only add a constant).

Stacked branches (``policy: stack``) are re-derived from the layer's effective weight W + ΣΔW, exactly as
``policy: merge`` re-derives them from the merged weight.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import ConfigError
from ..validate import is_int
from ._lowrank import absorb_dense, low_rank_linear
from .base import METHODS, Adapter, AdapterOptions, Frozen


@dataclasses.dataclass
class PiSSAOptions(AdapterOptions):
    # None: exact SVD (torch.linalg.svd). An int: randomized torch.svd_lowrank with that many subspace
    # iterations — far faster on large layers and close to exact for the top-r directions.
    svd_niter: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.svd_niter is not None and (not is_int(self.svd_niter) or self.svd_niter < 0):
            raise ConfigError(f"svd_niter must be null (exact SVD) or an integer >= 0, got {self.svd_niter!r}")


def principal_factors(weight: torch.Tensor, rank: int, svd_niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r^{1/2}, S_r^{1/2} V_rᵀ) of W, computed in float32 for accuracy."""
    w = weight.detach().float()
    if svd_niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        # Oversampling (q > r) is what makes a few power iterations accurate for the top-r directions.
        q = min(rank + max(rank, 10), *w.shape)
        u, s, v = torch.svd_lowrank(w, q=q, niter=svd_niter)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].t()
    root = s.sqrt()
    return u * root, root[:, None] * vh


@METHODS.register("pissa", "PiSSA: LoRA initialised on W's principal singular directions (Meng et al. 2024)")
class PiSSA(Adapter):
    Options = PiSSAOptions
    derives_from_weight = True

    def __init__(self, layer: nn.Linear, opts: PiSSAOptions, shared: nn.Module | None = None):
        super().__init__(layer, opts)
        b0, a0 = principal_factors(layer.weight, opts.rank, opts.svd_niter)
        root_s = opts.scale**0.5
        dt = layer.weight.dtype
        # Row-major: the SVD returns column-major factors, and a parameter with that layout gets gradients
        # with it too, which callers that flatten gradients with .view(-1) (Avalanche's A-GEM) reject.
        b0, a0 = (b0 / root_s).to(dt).contiguous(), (a0 / root_s).to(dt).contiguous()
        self.lora_A = nn.Parameter(a0.clone())
        self.lora_B = nn.Parameter(b0.clone())
        # Frozen starting point, saved with the adapter so a reload reproduces ΔW exactly.
        self.register_buffer("A0", a0)
        self.register_buffer("B0", b0)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.confine(self.scale * (self.lora_B @ self.lora_A - self.B0 @ self.A0))

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.cat([self.lora_B, -self.B0], dim=1)  # (d_out, 2r)
        return self.scale * b, self.confine(torch.cat([self.lora_A, self.A0], dim=0))

    def input_factor(self) -> torch.Tensor:
        return self.lora_A

    def forward(self, x: torch.Tensor, layer: nn.Linear, frozen: Frozen = None) -> torch.Tensor:
        # The constant −s·B₀A₀ joins the layer's frozen term: it reads the clean input (as the reference's
        # residual weight W − s·B₀A₀ does, with or without dropout) and no gradient is computed for it.
        weight, frozen = absorb_dense(layer.weight, frozen)
        left, right = -self.scale * self.B0, self.confine(self.A0)
        if frozen is not None:
            left, right = torch.cat([frozen[0], left], dim=1), torch.cat([frozen[1], right], dim=0)
        a = self.confine(self.lora_A)
        return low_rank_linear(x, weight, layer.bias, a, self.lora_B, self.scale, self.drop(x), (left, right))
