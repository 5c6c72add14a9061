"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

ΔW = s · B A with A ∈ R^{r×d_in} (kaiming-uniform, a=√5), B ∈ R^{d_out×r} (zero), s = α / r.
Factored forward: y = W x + b + s · B (A drop(x)) — two thin matmuls, ΔW never materialised.
Confined (``interference: project``, basis M (d_in, k)): A is replaced by A (I − M Mᵀ) in every path.
Input-side factor (orthogonal penalty): A.
"""

from __future__ import annotations

import torch
from torch import nn

from ._lowrank import low_rank_linear
from .base import METHODS, Adapter, AdapterOptions, Frozen, kaiming_uniform_


@METHODS.register("lora", "LoRA: ΔW = s·BA, B starts at zero (Hu et al. 2021)")
class LoRA(Adapter):
    Options = AdapterOptions
    imports_lora = True

    def __init__(self, layer: nn.Linear, opts: AdapterOptions, shared: nn.Module | None = None):
        super().__init__(layer, opts)
        w = layer.weight
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(opts.rank, w.shape[1], dtype=w.dtype, device=w.device)))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], opts.rank, dtype=w.dtype, device=w.device))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.confine(self.scale * (self.lora_B @ self.lora_A))

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale * self.lora_B, self.confine(self.lora_A)

    def set_lora(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        # ΔW = scale · b a = s · (scale / s · b) a: the same update under this adapter's own scale s.
        self.lora_A.copy_(a.to(self.lora_A))
        self.lora_B.copy_((b * (scale / self.scale)).to(self.lora_B))

    def input_factor(self) -> torch.Tensor:
        return self.lora_A

    def forward(self, x: torch.Tensor, layer: nn.Linear, frozen: Frozen = None) -> torch.Tensor:
        # One fused node: base output plus the scaled rank-r path (see _lowrank for the backward).
        a = self.confine(self.lora_A)
        return low_rank_linear(x, layer.weight, layer.bias, a, self.lora_B, self.scale, self.drop(x), frozen)
