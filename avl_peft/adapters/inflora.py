"""InfLoRA (Liang & Li, CVPR 2024, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning").

One branch per experience (``policy: stack``); experience t's branch is

    ΔW_t = s · B_t A_t,   A_t ∈ R^{r×d_in} designed before training and frozen,   B_t ∈ R^{d_out×r} (zero).

Design of A_t (:func:`~avl_peft.adapters.interference.design_input_factor`, called by ``begin_experience``
with the experience's layer inputs X (n, d_in) and the layer's GPM memory M (d_in, k)): the rows of A_t are
the top-r right singular vectors of X (I − M Mᵀ), scaled by 1/√3. So A_t M = 0 — the branch cannot change
the layer's output on inputs in span(M), the earlier experiences' feature subspace — and A_t spans the
directions where the new inputs carry most energy. The 1/√3 gives A_t's rows the norm LoRA's kaiming-uniform
rows have in expectation (E‖a‖² = d_in · 1/(3 d_in)), so B trains at LoRA's learning rates. Only B_t
trains. After the experience, ``end_experience`` grows M with that experience's inputs (GPM's rule).

Simplification: the paper keeps DualGPM bookkeeping (storing either the subspace or its complement,
whichever is smaller, with a threshold that grows per task); here plain GPM with one ``gpm_threshold``.

Until ``begin_experience`` designs it, A is kaiming-uniform like LoRA's (frozen), so an injected model
is a valid LoRA-with-frozen-A; without begin_experience InfLoRA is not interference-free.
A is a buffer (it never trains), so trainable parameters per layer: d_out · r.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ._lowrank import low_rank_linear
from .base import METHODS, Adapter, AdapterOptions, Frozen, kaiming_uniform_
from .interference import design_input_factor

ROW_SCALE = 1 / math.sqrt(3)  # LoRA's expected kaiming-uniform row norm (see module docstring)


@METHODS.register("inflora", "InfLoRA: A designed outside old tasks' input subspace, only B trains (Liang & Li 2024)")
class InfLoRA(Adapter):
    requires_stack = True  # a branch per experience is the method
    Options = AdapterOptions

    def __init__(self, layer: nn.Linear, opts: AdapterOptions, shared: nn.Module | None = None):
        super().__init__(layer, opts)
        w = layer.weight
        a = kaiming_uniform_(torch.empty(opts.rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.register_buffer("lora_A", a)  # a buffer: designed by begin(), never trained
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], opts.rank, dtype=w.dtype, device=w.device))

    @property
    def needs_memory(self) -> bool:
        return True

    def begin(self, inputs: torch.Tensor | None, memory: torch.Tensor) -> None:
        if inputs is None:
            raise ConfigError(
                "inflora designs A from the experience's layer inputs: call "
                "begin_experience(model, collect_inputs(model, batches)) before training"
            )
        with torch.no_grad():
            self.lora_A.copy_(ROW_SCALE * design_input_factor(inputs, memory, self.opts.rank))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.confine(self.scale * (self.lora_B @ self.lora_A))

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale * self.lora_B, self.confine(self.lora_A)

    def input_factor(self) -> torch.Tensor:
        return self.lora_A

    def forward(self, x: torch.Tensor, layer: nn.Linear, frozen: Frozen = None) -> torch.Tensor:
        a = self.confine(self.lora_A)
        return low_rank_linear(x, layer.weight, layer.bias, a, self.lora_B, self.scale, self.drop(x), frozen)
