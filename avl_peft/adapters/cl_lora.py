r"""CL-LoRA (He, Duan, Zhu, CVPR 2025, "CL-LoRA: Continual Low-Rank Adaptation for Rehearsal-Free
Class-Incremental Learning"): task-shared LoRA in the early blocks, task-specific LoRA in the late ones.

Roles (:meth:`CLLoRA.role`): the layers of blocks ``0 … S−1`` are **task-shared**, the rest **task-specific**;
``S`` = option ``shared_blocks`` (null: ⌈depth/2⌉, the paper's 6 of ViT-B's 12). One branch per experience
(``policy: stack``); ``s = alpha/r``, A (r, d_in), B (d_out, r).

Task-shared (paper §3.2, Eq. 3–6). ``ΔW_sh = s · B_sh A_sh`` with A_sh a random matrix with orthonormal rows
(QR; Eq. 3's "random orthogonal" down-projection) and B_sh = 0 at the start. A_sh trains in the first
experience only and is frozen after it; B_sh keeps learning across experiences. Stacking makes this exact:
experience t's branch starts with B_t = 0 and a frozen copy of A_sh, earlier branches are frozen, so the
layer computes ``s · (Σ_i B_i) A_sh`` — one shared B trained continually (fresh optimizer state per
experience, as :class:`~avl_peft.cl.plugin.PEFTPlugin` gives every restructure).

Knowledge distillation (Eq. 4): from the second experience on, the features after the shared blocks
(blocks 0 … S−1, then the final norm and pooling) go through the classifier for the current model (student)
and for the model without the current shared branches (teacher: the shared adapter as the previous
experience left it, no gradient):

    L_kd = λ_kd · (−1/N) Σ_n Σ_c softmax(z_teacher/T)_c · log softmax(z_student/T)_c,

``λ_kd`` = ``kd_weight`` (5), T = ``kd_temperature`` (2), added to the strategy's loss.

Gradient reassignment (Eq. 5–6): L_kd's gradient on the current shared B is scaled row by row by the
importance of that output row for earlier experiences, ``w_j = d_out · ‖B_old[j,:]‖ / Σ_k ‖B_old[k,:]‖``
with B_old = Σ_{i<t} B_i (all ones while B_old = 0). It is applied inside the student pass as
``B̃ = sg(B) + w ⊙ (B − sg(B))`` (sg: stop-gradient): the value is B, the gradient w ⊙ ∂L_kd/∂B.
Option ``reassign``.

Task-specific (§3.3, Eq. 7–8). Each experience gets a fresh branch with its own orthonormal A_t, B_t = 0
and learnable block-wise weights ω_t, drawn U(0.5, 1.5): ``ΔW_t = s · (ω_t ⊗ 1) ⊙ B_t A_t``, one weight
per output chunk (3 for a fused ``attn.qkv``, whose chunks are q, k, v as in the paper's per-projection
weights; 1 otherwise). Earlier branches and their ω are frozen. A penalty keeps the new block weights
apart from the earlier ones: ``λ_ω · mean_i |cos(ω_t, ω_i)|`` over the concatenated ω of every specific
layer (``block_orth``, 1e-4, the authors' setting). Option ``block_weights: false`` fixes ω = 1.

Deviations, stated: (1) the paper runs one forward per experience through its own specific adapters and
concatenates the features at test time; one model forward here sums every experience's specific branch
(as the other stacked methods do). (2) The paper takes the KD step and the classification step as two
optimizer steps; here their losses are summed into one step. (3) The paper adapts q and v; here the
project's targets apply (default every linear layer of the blocks).

Trainable parameters per layer at injection: shared r (d_in + d_out); specific r (d_in + d_out) + chunks.
From the second experience a shared layer trains r · d_out (A_sh frozen).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..validate import check_bool, check_number, is_int
from ._lowrank import low_rank_linear
from .base import METHODS, Adapter, AdapterOptions, Frozen
from .inject import backbone_root
from .stack import adapted_layers

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
SHARED, SPECIFIC = "shared", "specific"


@dataclasses.dataclass
class CLLoRAOptions(AdapterOptions):
    shared_blocks: int | None = None  # S: blocks 0…S−1 are task-shared; null: ceil(depth / 2)
    kd_weight: float = 5.0  # λ_kd (the authors' setting)
    kd_temperature: float = 2.0  # T
    reassign: bool = True  # gradient reassignment of the distillation gradient on the shared B
    block_weights: bool = True  # learnable ω on the task-specific branches
    block_orth: float = 1e-4  # λ_ω of the |cos| penalty between the current and earlier block weights

    def __post_init__(self) -> None:
        super().__post_init__()
        sb = self.shared_blocks
        if sb is not None and (not is_int(sb) or sb < 0):
            raise ConfigError(f"shared_blocks must be an integer >= 0 (or null for half the depth), got {sb!r}")
        check_number("kd_weight", self.kd_weight, low=0)
        check_number("kd_temperature", self.kd_temperature, low=0, exclusive_low=True)
        check_number("block_orth", self.block_orth, low=0)
        for key in ("reassign", "block_weights"):
            check_bool(key, getattr(self, key))


def _orthonormal_rows(rank: int, d_in: int, like: torch.Tensor) -> torch.Tensor:
    """(rank, d_in) with orthonormal rows: Q of a Gaussian matrix's QR (the global RNG, like LoRA's init)."""
    if like.device.type == "meta":
        return torch.empty(rank, d_in, dtype=like.dtype, device=like.device)
    q, _ = torch.linalg.qr(torch.randn(d_in, rank, dtype=torch.float64))
    return q.T.to(dtype=like.dtype, device=like.device).contiguous()


def _block(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


@METHODS.register("cl_lora", "CL-LoRA: task-shared LoRA with distillation + task-specific LoRA with block weights")
class CLLoRA(Adapter):
    requires_stack = True  # a task-specific branch per experience is the method
    Options = CLLoRAOptions
    # What the frozen branches leave behind once folded (docs/design.md, "Folding stacked branches"): their
    # block weights (the |cos| penalty) and their summed shared B (gradient reassignment). Both grow or are
    # handed on by place(), so a restore gives them the saved shapes.
    variable_buffers = ("old_block_weights",)

    def __init__(self, layer: nn.Linear, opts: CLLoRAOptions, shared: nn.Module | None = None):
        super().__init__(layer, opts)
        w = layer.weight
        d_out, d_in = w.shape
        self.lora_A = nn.Parameter(_orthonormal_rows(opts.rank, d_in, w))
        self.lora_B = nn.Parameter(torch.zeros(d_out, opts.rank, dtype=w.dtype, device=w.device))
        self.chunks = 3 if d_out == 3 * d_in else 1  # a fused qkv: one weight each for q, k and v
        self.register_buffer("block_weight", torch.ones(self.chunks, dtype=w.dtype, device=w.device))
        # ω of every earlier (frozen) branch of this layer, one row each; Σ of the earlier branches' B.
        self.register_buffer("old_block_weights", torch.empty(0, self.chunks, dtype=w.dtype, device=w.device))
        self.register_buffer("old_b", torch.zeros(d_out, opts.rank, dtype=w.dtype, device=w.device))
        # Set by the distillation pass only (never saved): teacher mode, and the gradient reassignment weights.
        self.teacher = False
        self.reassign_weights: torch.Tensor | None = None

    @classmethod
    def role(cls, name: str, names: list[str], opts: CLLoRAOptions) -> str:
        blocks = [b for b in map(_block, names) if b is not None]
        block = _block(name)
        if block is None or not blocks:
            return SPECIFIC
        s = opts.shared_blocks if opts.shared_blocks is not None else math.ceil((max(blocks) + 1) / 2)
        return SHARED if block < s else SPECIFIC

    def place(self, role: str, previous: Adapter | None) -> None:
        super().place(role, previous)
        if previous is not None:  # hand on what the frozen branch's penalty and reassignment need
            with torch.no_grad():
                self.old_block_weights = torch.cat([previous.old_block_weights, previous.block_weight.detach()[None]])
                self.old_b = previous.old_b + previous.lora_B.detach()
        if role == SPECIFIC and self.opts.block_weights:
            omega = torch.empty_like(self.block_weight)
            if omega.device.type != "meta":
                omega.uniform_(0.5, 1.5)
            del self.block_weight
            self.block_weight = nn.Parameter(omega)
        if role == SHARED and previous is not None:  # A_sh trained in the first experience only
            with torch.no_grad():
                self.lora_A.copy_(previous.lora_A)
            self.lora_A.requires_grad_(False)

    def _rows(self) -> torch.Tensor:
        """(d_out, 1): ω expanded over each chunk's output rows."""
        return self.block_weight.repeat_interleave(self.lora_B.shape[0] // self.chunks)[:, None]

    def _b(self) -> torch.Tensor:
        b = self.lora_B
        if self.reassign_weights is not None:
            b = b.detach() + self.reassign_weights[:, None] * (b - b.detach())
        return self._rows() * b

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scale * (self._rows() * self.lora_B) @ self.confine(self.lora_A)

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale * self._rows() * self.lora_B, self.confine(self.lora_A)

    def input_factor(self) -> torch.Tensor:
        return self.lora_A

    def forward(self, x: torch.Tensor, layer: nn.Linear, frozen: Frozen = None) -> torch.Tensor:
        if self.teacher:  # the model as the previous experience left it: earlier branches only
            w = layer.weight if frozen is None else layer.weight + frozen[0] @ frozen[1]
            return F.linear(x, w, layer.bias)
        a = self.confine(self.lora_A)
        return low_rank_linear(x, layer.weight, layer.bias, a, self._b(), self.scale, self.drop(x), frozen)

    # -- the model-level terms: distillation of the shared blocks, block-weight penalty --------------------

    @classmethod
    def model_loss(cls, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        layers = list(adapted_layers(model).items())
        if not layers or not isinstance(layers[0][1].adapter, CLLoRA):
            return None
        opts: CLLoRAOptions = layers[0][1].adapter.opts
        terms = []
        specific = [layer for _, layer in layers if layer.adapter.layer_role == SPECIFIC]
        n_old = specific[0].frozen_count() if specific else 0
        if opts.block_weights and opts.block_orth > 0 and n_old:
            current = torch.cat([layer.adapter.block_weight for layer in specific])
            old = torch.cat([layer.adapter.old_block_weights for layer in specific], dim=1)  # (n_old, Σ chunks)
            cos = [F.cosine_similarity(current, old[i], dim=0) for i in range(n_old)]
            terms.append(opts.block_orth * torch.stack(cos).abs().mean())
        shared = [(name, layer) for name, layer in layers if layer.adapter.layer_role == SHARED]
        if shared and shared[0][1].frozen_count() and opts.kd_weight > 0:
            terms.append(opts.kd_weight * _distillation(model, x, shared, opts))
        return sum(terms) if terms else None


def _distillation(model: nn.Module, x: torch.Tensor, shared: list, opts: CLLoRAOptions) -> torch.Tensor:
    """L_kd/λ_kd (module docstring) on the batch ``x``: student and teacher logits of the shared blocks."""
    _, root = backbone_root(model)
    if not all(hasattr(root, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head")):
        raise ConfigError(
            f"cl_lora distils the output of the shared blocks of a timm ViT; {type(root).__name__} is not"
        )
    depth = max(_block(name) for name, _ in shared) + 1
    head = root.head if root is model else getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ConfigError("cl_lora's distillation needs the model's classifier (model.head)")

    def logits() -> torch.Tensor:
        h = root.norm_pre(root.patch_drop(root._pos_embed(root.patch_embed(x))))
        for block in root.blocks[:depth]:
            h = block(h)
        return head(root.forward_head(root.norm(h), pre_logits=True))

    adapters = [layer.adapter for _, layer in shared]
    try:
        for a in adapters:
            a.teacher = True
        with torch.no_grad():
            teacher = logits()
        for a in adapters:
            a.teacher = False
            if opts.reassign:
                old = a.old_b.norm(dim=1)  # ‖B_old[j,:]‖, B_old = Σ of the frozen branches' B
                total = old.sum()
                a.reassign_weights = old * (old.numel() / total) if total > 0 else torch.ones_like(old)
        student = logits()
    finally:
        for a in adapters:
            a.teacher, a.reassign_weights = False, None
    t = opts.kd_temperature
    return -(F.softmax(teacher / t, dim=1) * F.log_softmax(student / t, dim=1)).sum(1).mean()
