"""SD-LoRA (Wu et al., ICLR 2025, "SD-LoRA: Scalable Decoupled Low-Rank Adaptation for Class Incremental
Learning"): magnitudes and directions of the per-experience LoRA updates learned separately.

One branch per experience (``policy: stack``). After experience t a layer computes

    W = W₀ + Σ_{i<t} α_i · B_i A_i / ‖B_i A_i‖_F + α_t · s · B_t A_t,

A_i ∈ R^{r×d_in}, B_i ∈ R^{d_out×r}, α_i scalars, s = alpha/r. Earlier directions B_i A_i / ‖B_i A_i‖_F are
frozen; every magnitude α_i stays learnable; the current B_t, A_t, α_t train.

The current branch is not normalised: at injection B_t = 0 (LoRA's init, A_t kaiming-uniform, α_t = 1), so
ΔW_t = 0 and B_t A_t / ‖B_t A_t‖_F would be 0/0 with an unbounded gradient at B_t = 0. Instead the branch
trains as α_t·s·B_t A_t (exactly LoRA at α_t = 1) and is normalised when it is frozen (stacking):

    n_t = ‖B_t A_t‖_F,   α_t ← α_t · s · n_t,   then ΔW_t = α_t · B_t A_t / n_t   — the same ΔW,

so outputs do not change at stacking and α_t is the Frobenius norm of the update it stands for (signed).
n_t is computed once there in float64 and kept as a buffer (``direction_norm``): B_t, A_t never change
again. A branch frozen with B_t A_t = 0 (never trained) gets α_t = 0 and n_t = 1. Normalising without
rescaling α would change the model's function at every experience boundary.

With ``interference: project`` A_t is confined, A_t (I − M Mᵀ), and n_t is the norm of the confined update.
Later experiences still move α_i, so earlier branches' updates change in scale by design. Input-side
factor (orthogonal penalty): A. Trainable parameters: r (d_in + d_out) + 1 per layer at injection; after t
stackings r (d_in + d_out) + t + 1 (the frozen magnitudes stay trainable), t · r (d_in + d_out) frozen.
Frozen branches are folded as one stacked direction pair and one magnitude vector (:mod:`.fold`).
"""

from __future__ import annotations

import torch
from torch import nn

from ._lowrank import low_rank_linear
from .base import METHODS, Adapter, AdapterOptions, Frozen, kaiming_uniform_


@METHODS.register("sdlora", "SD-LoRA: frozen unit-norm directions, learnable magnitudes (Wu et al. 2025)")
class SDLoRA(Adapter):
    requires_stack = True  # a branch per experience is the method
    Options = AdapterOptions

    def __init__(self, layer: nn.Linear, opts: AdapterOptions, shared: nn.Module | None = None):
        super().__init__(layer, opts)
        w = layer.weight
        kw = dict(dtype=w.dtype, device=w.device)
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(opts.rank, w.shape[1], **kw)))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], opts.rank, **kw))
        self.magnitude = nn.Parameter(torch.ones((), **kw))
        # ‖B A‖_F of a frozen direction; meaningless (1) while the branch is current.
        self.register_buffer("direction_norm", torch.ones((), **kw))
        self.normalised = False  # structural, set by freeze(): restore reaches it through stack()

    def coefficient(self) -> torch.Tensor:
        """c with ΔW = c · B A_conf: α·s while current, α / ‖B A_conf‖_F once frozen."""
        if self.normalised:
            return self.magnitude / self.direction_norm
        return self.magnitude * self.scale

    def _direction(self) -> torch.Tensor:  # (d_out, d_in): B A, confined
        return self.confine(self.lora_B @ self.lora_A)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        d = self._direction()
        if self.normalised:  # the definition: unit-norm direction (norm recomputed here, not the cached one)
            n = torch.linalg.matrix_norm(d.double())
            return self.magnitude * (d / n.to(d.dtype)) if n > 0 else torch.zeros_like(d)
        return self.magnitude * self.scale * d

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.coefficient() * self.lora_B, self.confine(self.lora_A)

    def input_factor(self) -> torch.Tensor:
        return self.lora_A

    def fold_parts(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # The unit direction B A / ‖B A‖_F stays fixed; its magnitude keeps training (stacked in fold.py).
        return self.lora_B / self.direction_norm, self.confine(self.lora_A), self.magnitude

    def freeze(self) -> None:
        if not self.normalised:
            with torch.no_grad():
                n = torch.linalg.matrix_norm(self._direction().double())
                if n > 0:
                    self.magnitude.mul_(float(self.scale * n))
                    self.direction_norm.fill_(float(n))
                else:
                    self.magnitude.zero_()
                    self.direction_norm.fill_(1.0)
            self.normalised = True
        self.lora_A.requires_grad_(False)
        self.lora_B.requires_grad_(False)
        self.magnitude.requires_grad_(True)  # SD-LoRA: every magnitude keeps learning

    def forward(self, x: torch.Tensor, layer: nn.Linear, frozen: Frozen = None) -> torch.Tensor:
        # The magnitude enters through B (c·B, a d_out×r product) so the fused node's scale stays a constant.
        b = self.coefficient() * self.lora_B
        return low_rank_linear(x, layer.weight, layer.bias, self.confine(self.lora_A), b, 1.0, self.drop(x), frozen)
