"""The shared fast path of every low-rank adapter: y = x (W + L₀R₀)ᵀ + b + s · (x_l Aᵀ) Bᵀ in one autograd node.

LoRA, PiSSA (frozen term L₀R₀ = −s·B₀A₀), LoRETTA (reconstructed A, B), InfLoRA (frozen A), SD-LoRA (c·B)
and WeGeFT (ΔW = s W φ ψ, i.e. A = ψ, B = W φ) all call :func:`low_rank_linear`; under ``policy: stack``
the layer's earlier branches join the frozen term L₀R₀ (:class:`~avl_peft.adapters.base.AdaptedLinear`).

Why a custom node: the rank-r path is memory-bound work — each thin product streams an (N × d) activation
or gradient through memory — so what counts is how many such passes a step makes, not FLOPs. Two paths:

- **merged** (same input for both paths, full precision, enough tokens): the forward runs one GEMM with the
  effective weight W + L₀R₀ + s·B A (formed per call: d_out·d_in·(q + q₀) FLOPs, independent of the N
  tokens), and the backward gets the input gradient from one GEMM with it as well. Against the
  frozen-backbone limit this leaves three thin passes (x Aᵀ in the forward; g B and (x Aᵀ)ᵀ g, plus
  (g B)ᵀ x, in the backward) and drops the two read-modify-write passes over the output and the input
  gradient that the split path makes. Per layer, fp32, N = 2080, r = 8, one core, medians of 60
  interleaved repetitions of forward + backward relative to the frozen layer: 192 → 576: 1.27 merged vs
  1.31 split; 768 → 192: 1.25 vs 1.32; 384 → 1536: 1.15 vs 1.19. The effective weight is recomputed in
  the backward rather than saved, so memory stays as for the split path.
- **split** (dropout on the adapter's input, few tokens — forming W + s·B A would cost more than the
  passes it saves —, or a low-precision compute dtype): base output plus the scaled rank-r path, both
  accumulated in one ``addmm``.

Both paths write every thin product in the layout that is fast on CPU, which autograd's own choice is not
(N = 2080, r = 8, one core, medians of 60 interleaved repetitions: ``g @ B`` 0.43 ms vs ``Bᵀ @ gᵀ``
0.53 ms at d = 576, 1.06 vs 1.68 ms at d = 1536; for B's gradient ``(xaᵀ @ g)ᵀ`` rather than ``gᵀ @ xa``).

Under bf16/fp16 autocast the node runs in the autocast dtype (its inputs are cast as autocast would cast
them for ``F.linear``) on the split path: merging a small update into a bf16 weight would round it to the
weight's 8-bit mantissa, which autocast's LoRA does not do. In both paths no gradient is computed for what
does not need one (the frozen W, InfLoRA's A, the first block's input). ``torch.autograd.gradcheck`` tests
tie both paths to the plain-ops definition.

Shapes: x, x_l (..., d_in); W (d_out, d_in); b (d_out,) or None; A (q, d_in); B (d_out, q);
L₀ (d_out, q₀), R₀ (q₀, d_in).
``x_l`` is the adapter path's input (``dropout(x)``, or ``x`` itself when dropout is off).
"""

from __future__ import annotations

import torch

from .base import Frozen

FULL_PRECISION = (torch.float32, torch.float64)
# Tests and benchmarks set this to "merged" or "split" to exercise one path regardless of the shape rule,
# or to "plain" for the unfused definition (plain ops; what autocast ran before the node supported it).
FORCE_PATH: str | None = None


def use_merged(n: int, d_out: int, d_in: int) -> bool:
    """Whether forming W + s·B A beats the passes it saves, for N = n tokens.

    Merged costs about 4·d_out·d_in element transfers (form the weight in the forward and again in the
    backward); split costs about n·(3·d_in + 2·d_out) (re-read x, read-modify-write the output and the
    input gradient). For ViT-Tiny's qkv that is n ≥ 256 tokens, for ViT-B's fc1 n ≥ 1,118 (6 images).
    """
    if FORCE_PATH is not None:
        return FORCE_PATH == "merged"
    return n * (3 * d_in + 2 * d_out) >= 4 * d_out * d_in


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_l, weight, bias, a, b, left, right, scale: float, grad: bool):
        shape = x.shape
        d_out = weight.shape[0]
        x2 = x.reshape(-1, shape[-1])  # (N, d_in)
        same = x_l is None  # None: the adapter path reads x itself
        xl2 = x2 if same else x_l.reshape(-1, shape[-1])
        frozen = left is not None
        merged = same and weight.dtype in FULL_PRECISION and use_merged(x2.shape[0], d_out, shape[-1])
        # needs_input_grad says what requires grad even under no_grad/inference_mode; ``grad`` is the caller's
        # grad mode, so evaluation computes and keeps nothing for a backward that will never run.
        needs = ctx.needs_input_grad if grad else (False,) * 9
        need_x, _, need_w, _, need_a, need_b, need_left, need_right = needs[:8]
        xa = xl2 @ a.t() if (need_b or not merged) else None  # (N, q)
        xr = x2 @ right.t() if frozen and (need_left or not merged) else None  # (N, q₀)
        w = _effective(weight, a, b, left, right, scale) if merged else weight
        out = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
        if not merged:
            out.addmm_(xa, b.t(), alpha=scale)  # (N, d_out): base + s·(x A^T) B^T, one accumulation
            if frozen:
                out.addmm_(xr, left.t())
        keep_x = x2 if (need_a and same) or need_w or need_right else None
        keep_xl = xl2 if need_a and not same else None
        ctx.save_for_backward(
            keep_x, keep_xl, xa if need_b else None, xr if need_left else None, weight, a, b, left, right
        )
        ctx.scale, ctx.shape, ctx.has_bias, ctx.same, ctx.merged = scale, shape, bias is not None, same, merged
        return out.view(*shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad):
        x2, xl2, xa, xr, weight, a, b, left, right = ctx.saved_tensors
        xl2 = x2 if ctx.same else xl2
        s = ctx.scale
        g = grad.reshape(-1, weight.shape[0])  # (N, d_out)
        need_x, need_xl, need_w, need_bias, need_a, need_b, need_left, need_right = ctx.needs_input_grad[:8]
        grad_x = grad_xl = grad_w = grad_bias = grad_a = grad_b = grad_left = grad_right = None
        split_x = need_x and not ctx.merged  # the input gradient is assembled from the separate paths
        gxa = glr = None
        if need_a or need_xl or (split_x and ctx.same):
            gxa = (g @ b).mul_(s)  # (N, q) = g · sB
            if need_a:
                grad_a = gxa.t() @ xl2  # (q, d_in)
        if need_b:
            grad_b = (xa.t() @ g).t().mul_(s)  # (d_out, q), in the fast layout (not gᵀ @ xa)
        if left is not None and (need_right or split_x):
            glr = g @ left  # (N, q₀)
            if need_right:
                grad_right = glr.t() @ x2
        if need_left:
            grad_left = (xr.t() @ g).t()
        if need_x and ctx.merged:
            grad_x = g @ _effective(weight, a, b, left, right, s)  # recomputed, not saved
        elif need_x:
            grad_x = g @ weight
            if ctx.same:  # both paths read x: accumulate in place instead of autograd's extra add
                grad_x.addmm_(gxa, a)
            if glr is not None:
                grad_x.addmm_(glr, right)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.shape)
        if need_xl:
            grad_xl = (gxa @ a).view(ctx.shape)
        if need_w:
            grad_w = (x2.t() @ g).t()
        if need_bias and ctx.has_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_xl, grad_w, grad_bias, grad_a, grad_b, grad_left, grad_right, None, None


def _effective(weight, a, b, left, right, scale: float) -> torch.Tensor:
    """W + L₀ R₀ + s·B A (d_out × d_in): d_out·d_in·(q + q₀) FLOPs, whatever the number of tokens."""
    w = torch.addmm(weight, b, a, alpha=scale)
    return w.addmm_(left, right) if left is not None else w


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def absorb_dense(weight: torch.Tensor, frozen: Frozen) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(W + F, None) for a dense frozen term F, else (W, frozen): the frozen term in the form the node takes."""
    if isinstance(frozen, torch.Tensor):
        return weight + frozen.to(weight.dtype), None
    return weight, frozen


def low_rank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
    frozen: Frozen = None,
) -> torch.Tensor:
    """F.linear(x, W + L₀R₀, bias) + scale · F.linear(F.linear(x_lora, A), B), fused.

    ``x_lora`` defaults to x. ``frozen`` = (L₀ (d_out, q₀), R₀ (q₀, d_in)): a low-rank term that belongs to
    the layer's weight on the clean input — earlier stacked branches, PiSSA's −s·B₀A₀ — folded into the
    same node (gradients reach L₀/R₀ only if they require them, e.g. SD-LoRA's magnitudes through L₀); or
    that term as a dense (d_out, d_in) matrix, which is added to W (earlier branches folded past the size
    where a pair pays, see fold.py).
    """
    weight, frozen = absorb_dense(weight, frozen)
    # The node gets x_l = None when the adapter reads x itself (no dropout): one tensor passed as two inputs
    # would also make torch.compile break the graph here.
    x_l = None if x_lora is None or x_lora is x else x_lora
    left, right = frozen if frozen is not None else (None, None)
    if FORCE_PATH == "plain":
        out = torch.nn.functional.linear(x, weight, bias) + ((x if x_l is None else x_l) @ a.t()) @ (scale * b).t()
        return out + (x @ right.t()) @ left.t() if left is not None else out
    low = _autocast_dtype(x)
    if low is not None:
        # Cast as autocast casts F.linear's operands (differentiably: gradients return in each input's
        # dtype), then run the node in that dtype with autocast off so every product inside stays in it.
        x, weight, a, b = x.to(low), weight.to(low), a.to(low), b.to(low)
        x_l, bias, left, right = (t.to(low) if t is not None else None for t in (x_l, bias, left, right))
        with torch.autocast(x.device.type, enabled=False):
            return _LowRankLinear.apply(x, x_l, weight, bias, a, b, left, right, float(scale), torch.is_grad_enabled())
    dtype = weight.dtype
    if any(t is not None and t.dtype != dtype for t in (x, x_l, a, b, left, right)):
        # Mixed dtypes outside autocast: plain ops (and PyTorch's own dtype errors).
        x_l = x if x_l is None else x_l
        out = torch.nn.functional.linear(x, weight, bias) + (x_l @ a.t()) @ (scale * b).t()
        return out + (x @ right.t()) @ left.t() if left is not None else out
    return _LowRankLinear.apply(x, x_l, weight, bias, a, b, left, right, float(scale), torch.is_grad_enabled())
