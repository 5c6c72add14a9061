"""WeGeFT (Savadikar, Song, Wu, ICML 2025, "WeGeFT: Weight-Generative Fine-Tuning"; earlier "GIFT").

The update is generated from the frozen weight itself:
    ΔW = s · W φ ψ,   φ ∈ R^{d_in×r} (kaiming-uniform),  ψ ∈ R^{r×d_in} (zero),  s = α/r (1 by default),
so every column of ΔW lies in the column space of W ("structurally aligned"). By default one (φ, ψ)
pair is shared by all layers of the same target type (e.g. every ``attn.proj``), so the parameter cost
does not grow with depth; ``share: false`` gives each layer its own pair.
Factored forward: ΔW = (s W φ) ψ, so y = W x + b + s (W φ)(ψ x) — LoRA's fused path (see ``_lowrank``)
with A = ψ and B = W φ; B (d_out × r) costs d_out·d_in·r per call, independent of the number of tokens,
and its gradient reaches φ through one small product (φ's gradient is Wᵀ times B's).

Interference: the input side of ΔW = s W φ ψ is ψ — ΔW x depends on x only through ψ x — so ψ's rows are
the update's input subspace (orthogonal penalty), and ``project`` confines ψ to ψ (I − M Mᵀ) with the
layer's own basis M, even when ψ is shared across layers (each layer confines its own copy of the product).
Stacking gives every target type a fresh shared generator, so earlier generators stay frozen.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..validate import check_bool
from ._lowrank import low_rank_linear
from .base import METHODS, Adapter, AdapterOptions, Frozen, kaiming_uniform_


@dataclasses.dataclass
class WeGeFTOptions(AdapterOptions):
    share: bool = True  # one (φ, ψ) per target type: cost independent of depth, as in the paper

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("share", self.share)


class WeGeFTGenerator(nn.Module):
    """The (φ, ψ) pair; one instance may be referenced by many layers."""

    def __init__(self, d_in: int, rank: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        # φ is stored transposed (r × d_in) so kaiming-uniform sees fan_in = d_in like nn.Linear.
        self.phi_t = nn.Parameter(kaiming_uniform_(torch.empty(rank, d_in, dtype=dtype, device=device)))
        self.psi = nn.Parameter(torch.zeros(rank, d_in, dtype=dtype, device=device))

    @property
    def phi(self) -> torch.Tensor:  # (d_in, r)
        return self.phi_t.t()


@METHODS.register("wegeft", "WeGeFT: ΔW = Wφψ generated from the frozen weight (Savadikar et al. 2025)")
class WeGeFT(Adapter):
    Options = WeGeFTOptions
    shared = True

    def __init__(self, layer: nn.Linear, opts: WeGeFTOptions, shared: nn.Module | None = None):
        super().__init__(layer, opts)
        w = layer.weight
        self.gen = shared if shared is not None else WeGeFTGenerator(w.shape[1], opts.rank, w.dtype, w.device)

    @staticmethod
    def new_shared(layer: nn.Linear, opts: WeGeFTOptions) -> WeGeFTGenerator:
        w = layer.weight
        return WeGeFTGenerator(w.shape[1], opts.rank, w.dtype, w.device)

    @staticmethod
    def max_rank(d_out: int, d_in: int) -> int:
        return d_in

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.confine(self.scale * (weight @ self.gen.phi @ self.gen.psi))

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale * (weight @ self.gen.phi), self.confine(self.gen.psi)

    def input_factor(self) -> torch.Tensor:
        return self.gen.psi

    def factor_owner(self) -> nn.Module:
        return self.gen

    def shared_module(self) -> nn.Module | None:
        return self.gen if self.opts.share else None

    def forward(self, x: torch.Tensor, layer: nn.Linear, frozen: Frozen = None) -> torch.Tensor:
        # ΔW x = s (W φ)(ψ x): the low-rank node with B = W φ. Computing y = W (x + s φ ψ x) instead would
        # stream an extra (tokens × d_in) input copy through memory in the forward and again in the backward.
        b = layer.weight @ self.gen.phi_t.t()  # (d_out, r)
        psi = self.confine(self.gen.psi)
        return low_rank_linear(x, layer.weight, layer.bias, psi, b, self.scale, self.drop(x), frozen)
