"""WeGeFT (Savadikar, Song, Wu, ICML 2025, "WeGeFT: Weight-Generative Fine-Tuning"; earlier "GIFT").

The update is generated from the frozen weight itself:
    ΔW = s · W φ ψ,   φ ∈ R^{d_in×r} (kaiming-uniform),  ψ ∈ R^{r×d_in} (zero),  s = α/r (1 by default),
so every column of ΔW lies in the column space of W ("structurally aligned"). By default one (φ, ψ)
pair is shared by all layers of the same target type (e.g. every ``attn.proj``), so the parameter cost
does not grow with depth; ``share: false`` gives each layer its own pair.
Fast forward: y = W (x + φ (ψ x)) + b — a rank-r correction of the input, then one base matmul.
Factored form (for stacked branches): ΔW = (s W φ) ψ, L = s W φ (d_out × r) costs d_out·d_in·r per call,
independent of the number of tokens.

Interference: the input side of ΔW = s W φ ψ is ψ — ΔW x depends on x only through ψ x — so ψ's rows are
the update's input subspace (orthogonal penalty), and ``project`` confines ψ to ψ (I − M Mᵀ) with the
layer's own basis M, even when ψ is shared across layers (each layer confines its own copy of the product).
Stacking gives every target type a fresh shared generator, so earlier generators stay frozen.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import ConfigError
from ._lowrank import generated_linear
from .base import METHODS, Adapter, AdapterOptions, kaiming_uniform_


@dataclasses.dataclass
class WeGeFTOptions(AdapterOptions):
    share: bool = True  # one (φ, ψ) per target type: cost independent of depth, as in the paper

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.share, bool):
            raise ConfigError(f"share must be true or false, got {self.share!r}")


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

    def forward(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        psi = self.confine(self.gen.psi)
        if isinstance(self.drop, nn.Identity):
            # x + s φ ψ x, then the single base matmul, fused (see _lowrank for the backward).
            return generated_linear(x, layer.weight, layer.bias, self.gen.phi_t, psi, self.scale)
        h = x + (self.drop(x) @ psi.t()) @ (self.scale * self.gen.phi_t)
        return layer(h)
