"""Interference control between experiences, for every adapter method (torch only; the plugin calls it).

``interference: orthogonal`` (O-LoRA, Wang et al., EMNLP 2023). With R_t (q, d_in) the current branch's
input-side factor and R_i those of the frozen branches of the same layer (LoRA/PiSSA/SD-LoRA/InfLoRA: A,
WeGeFT: ψ, LoRETTA: the reconstructed A), the loss term is

    λ · Σ_layers Σ_i ‖R_i R_tᵀ‖²_F,

zero exactly when the rows of R_t are orthogonal to every earlier branch's rows, i.e. when the new update
reads input directions no earlier update reads. A factor shared by several layers (WeGeFT) counts once.

``interference: project`` (GPM, Saha et al., ICLR 2021, as InfLoRA uses it). Per layer a basis M (d_in, k)
of earlier experiences' input features is kept; the current branch is confined, ΔW_t (I − M Mᵀ), so
ΔW_t x = 0 for x in span(M) and the layer's output on old inputs in that span cannot change. GPM's basis
update after an experience, for its layer inputs X (n, d_in), R = Xᵀ (d_in, n), R̂ = R − M Mᵀ R,
R̂ = Û Σ̂ V̂ᵀ: keep the smallest k with

    ‖M Mᵀ R‖²_F + Σ_{j≤k} σ̂_j²  ≥  ε_th ‖R‖²_F        (ε_th = gpm_threshold)

and append Û[:, :k] to M (the first experience has M empty, so this is the plain energy rule).

Call order under ``policy: stack`` (see the plugin):

1. experience 0: ``inject``; experience t > 0: :func:`~avl_peft.adapters.stack.stack`;
2. ``inputs = collect_inputs(model, batches, max_samples)`` if :func:`needs_inputs`; then
   :func:`begin_experience` (confines the new branch, lets InfLoRA design its A);
3. each training step: ``loss + interference_penalty(model)``;
4. after training: ``end_experience(model, collect_inputs(...))`` (GPM memory update), then checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..validate import is_int
from .stack import adapted_layers


def needs_inputs(model: nn.Module) -> bool:
    """Whether begin/end_experience need collected layer inputs (``interference: project`` or InfLoRA)."""
    return any(layer.adapter.needs_memory for layer in adapted_layers(model).values())


def collect_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor | tuple | list], max_samples: int = 1024, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Each adapted layer's input rows (n ≤ max_samples, d_in), sampled uniformly over every token seen.

    ``batches``: model inputs, or tuples/lists whose first element is the input (a data loader's batches);
    they are moved to the model's device. Tokens are flattened ((N, T, d) → (N·T, d)). The sample is a
    seeded reservoir: each row draws a random key and the max_samples smallest keys are kept, so the
    result is uniform over all rows and the same on every call. The model runs in eval mode without
    gradients and returns to its previous mode.
    """
    if not is_int(max_samples) or max_samples <= 0:
        raise ConfigError(f"max_samples must be a positive integer, got {max_samples!r}")
    layers = adapted_layers(model)
    gen = torch.Generator().manual_seed(seed)
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            keys = torch.rand(x.shape[0], generator=gen).to(x.device)
            if name in kept:
                old_keys, old_rows = kept[name]
                keys, x = torch.cat([old_keys, keys]), torch.cat([old_rows, x])
            if x.shape[0] > max_samples:
                idx = torch.topk(keys, max_samples, largest=False).indices
                keys, x = keys[idx], x[idx]
            kept[name] = (keys, x)

        return record

    device = next(model.parameters()).device
    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: kept[name][1] for name in layers if name in kept}


def begin_experience(model: nn.Module, inputs: Mapping[str, torch.Tensor] | None = None) -> None:
    """Prepare every layer's current branch to train: confine it (project), let InfLoRA design its A.

    Call after inject (experience 0) or :func:`stack` (later experiences), before training.
    """
    for name, layer in adapted_layers(model).items():
        branch = layer.adapter
        if layer.experience_done and branch.needs_memory:
            raise ConfigError(
                f"layer '{name}': its branch already trained an experience; interference 'project' and InfLoRA "
                "need a new branch per experience (policy: stack — call stack(model) before begin_experience)"
            )
        if branch.opts.interference == "project":
            branch.basis = layer.memory.clone()
        branch.begin(None if inputs is None else inputs.get(name), layer.memory)


def end_experience(model: nn.Module, inputs: Mapping[str, torch.Tensor] | None = None) -> None:
    """After training an experience: grow each layer's GPM memory with that experience's inputs."""
    for name, layer in adapted_layers(model).items():
        branch = layer.adapter
        if branch.needs_memory:
            if inputs is None or name not in inputs:
                raise ConfigError(
                    f"layer '{name}' keeps a GPM memory (interference 'project' or InfLoRA): pass "
                    "end_experience(model, collect_inputs(model, batches)) with this experience's data"
                )
            layer.memory = gpm_update(layer.memory, inputs[name], branch.opts.gpm_threshold)
        layer.experience_done = True


def gpm_update(memory: torch.Tensor, inputs: torch.Tensor, threshold: float) -> torch.Tensor:
    """GPM's basis update (module docstring): memory (d_in, k) and inputs (n, d_in) → basis (d_in, k')."""
    d = memory.shape[0]
    r = inputs.detach().to(torch.float64).t()  # (d_in, n), columns are samples
    m = memory.to(r)
    total = r.pow(2).sum()
    if total == 0 or m.shape[1] >= d:
        return memory
    if m.shape[1]:
        projected = m @ (m.t() @ r)
        explained = projected.pow(2).sum()
        r = r - projected
    else:
        explained = torch.zeros((), dtype=r.dtype, device=r.device)
    if explained >= threshold * total:
        return memory
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    reached = (explained + torch.cumsum(s.pow(2), 0)) >= threshold * total
    k = int(reached.nonzero()[0, 0]) + 1 if bool(reached.any()) else s.shape[0]
    # Directions of (numerically) zero energy are arbitrary and may even lie in span(M): never keep them.
    significant = int((s > s[0] * 1e-6).sum()) if s.numel() else 0
    new = u[:, : min(k, significant, d - m.shape[1])]
    if new.shape[1] == 0:
        return memory
    if m.shape[1]:
        # R̂ ⊥ span(M) in exact arithmetic; re-orthogonalise so rounding never lets M drift from orthonormal.
        new = new - m @ (m.t() @ new)
        new = torch.linalg.qr(new).Q
    return torch.cat([m, new], dim=1).to(dtype=memory.dtype, device=memory.device)


def orthogonal_penalty(old: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """‖old · currentᵀ‖²_F for input factors old (q_o, d_in), current (q, d_in): 0 iff their rows are orthogonal."""
    return (old @ current.t()).pow(2).sum()


def interference_penalty(model: nn.Module) -> torch.Tensor:
    """O-LoRA's λ Σ_layers Σ_frozen ‖R_i R_tᵀ‖²_F over layers with ``interference: orthogonal`` (0 if none).

    Σ_frozen ‖R_i R_tᵀ‖²_F = ‖R_old R_tᵀ‖²_F with R_old the layer's folded old input factors (fold.py), so
    one product per layer whatever the number of experiences. Differentiable in the current branches'
    factors; the old factors are constants. A current factor shared by several layers (WeGeFT's generator,
    whose layers share their old generators too) counts once.
    """
    total: torch.Tensor | None = None
    seen: set[int] = set()
    for layer in adapted_layers(model).values():
        current = layer.adapter
        folded = layer.folded
        if current.opts.interference != "orthogonal" or folded is None or current.opts.orth_lambda == 0:
            continue
        owner = id(current.factor_owner())
        if owner in seen or not folded.inputs.shape[0]:
            continue
        seen.add(owner)
        term = current.opts.orth_lambda * orthogonal_penalty(folded.inputs, current.input_factor())
        total = term if total is None else total + term
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total


def design_input_factor(
    inputs: torch.Tensor | None, memory: torch.Tensor, rank: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """InfLoRA's input factor: r orthonormal rows (r, d_in) spanning the top principal directions of the
    inputs projected out of span(memory): X̂ = X (I − M Mᵀ), rows = the top-r right singular vectors of X̂.

    When X̂ has fewer than r significant directions (few samples), the rest are seeded random directions in
    the complement of span(M) and of the chosen rows. When the complement itself is smaller than r (the memory
    fills almost all of R^{d_in}), the missing rows are zero — that branch then has a lower rank — with a
    warning, so the factor never reads the old subspace.
    """
    d = memory.shape[0]
    m = memory.detach().to(torch.float64)
    free = d - m.shape[1]
    rows = torch.zeros(0, d, dtype=torch.float64, device=memory.device)
    if inputs is not None and inputs.numel():
        x = inputs.detach().to(device=memory.device, dtype=torch.float64)
        if m.shape[1]:
            x = x - (x @ m) @ m.t()
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        keep = s > s[0] * 1e-6 if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
        rows = vh[keep][: min(rank, free)]
    if rows.shape[0] < min(rank, free):
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        extra = torch.randn(min(rank, free) - rows.shape[0], d, generator=g, dtype=torch.float64).to(rows.device)
        taken = torch.cat([m.t(), rows], dim=0)  # (k + c, d), orthonormal rows
        extra = extra - (extra @ taken.t()) @ taken
        rows = torch.cat([rows, torch.linalg.qr(extra.t()).Q.t()], dim=0)
    if m.shape[1] and rows.shape[0]:  # exact orthogonality to the memory, whatever the rounding above
        rows = rows - (rows @ m) @ m.t()
        rows = torch.linalg.qr(rows.t()).Q.t()
    if rows.shape[0] < rank:
        warnings.warn(
            f"InfLoRA: only {free} input directions lie outside the old subspace (rank {rank}); the extra rows are "
            "zero. Lower gpm_threshold or rank.",
            stacklevel=3,
        )
        rows = torch.cat([rows, rows.new_zeros(rank - rows.shape[0], d)], dim=0)
    return rows.to(dtype=memory.dtype, device=memory.device)
