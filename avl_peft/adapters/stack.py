"""``policy: stack`` — a new branch per experience, earlier branches frozen and folded — and its checkpoints.

After experience t a layer holds branches 0…t (one per experience) on its frozen weight W (d_out, d_in):

    y = W x + b + Σ_{i<t} ΔW_i x + ΔW_t x,      ΔW_i = L_i R_i  (L_i (d_out, q_i), R_i (q_i, d_in)).

:func:`stack` freezes every layer's current branch, folds it into the layer's
:class:`~avl_peft.adapters.fold.FoldedBranches` (``AdaptedLinear.folded``: the sum of the frozen ΔWs, what
O-LoRA and SD-LoRA still need of them, in sizes that do not grow with the stream except SD-LoRA's
directions) and starts a fresh branch of the same method and options, with ΔW = 0 (so outputs do not
change at stacking):

* WeGeFT: one fresh generator (φ, ψ) per group of layers that shared the previous one.
* PiSSA: the new branch is derived from the layer's effective weight W + Σ_i ΔW_i (all branches, the one
  just frozen included) — the same starting point ``policy: merge`` gives it, where the merged weight is W.
* SD-LoRA: freezing rescales the magnitude so the frozen direction is unit-norm (see sdlora.py).
* ``interference: project``: the new branch is confined away from the layer's GPM memory.

Why not fold into W (which is what ``merge`` does): the frozen sum stays separate from the backbone, so
O-LoRA's old input factors, SD-LoRA's learnable magnitudes and :func:`avl_peft.merge` (which folds
everything at once) keep working, and the backbone itself never changes under ``stack``.

Checkpoints: the folded terms (``<layer>.folded.…``) and the GPM memory (``<layer>.memory``) live in the
module's ``state_dict`` but outside ``<layer>.adapter.``, and they change size as experiences pass.
:func:`adapter_state_dict` returns every adapter tensor; :func:`load_adapter_state` re-creates the
structure from the saved keys and shapes, then loads the values. States written before folding (one
``<layer>.frozen.<i>.…`` entry per branch) are refused with a message saying so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import ConfigError, key_summary
from .base import AdaptedLinear, Adapter, WeightView
from .fold import FoldedBranches

_UNFOLDED_KEY = re.compile(r"(?:^|\.)frozen\.(\d+)\.")  # the per-branch format before folding
_COUNT_KEY = re.compile(r"(?:^|\.)folded\.count$")
# Buffers whose column count grows with the GPM bases: (d_in, k).
_VARIABLE = ("basis", "memory")


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Every adapted layer by module name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def stack(model: nn.Module) -> int:
    """Freeze every layer's current branch and start a fresh one; return the frozen branches per layer."""
    layers = adapted_layers(model)
    if not layers:
        raise ConfigError("stack: the model has no adapters; inject a method first")
    fresh: dict[int, nn.Module] = {}  # id(previous shared module) -> its successor
    with torch.no_grad():
        for layer in layers.values():
            old: Adapter = layer.adapter
            cls = type(old)
            ref = WeightView(layer.base.weight + layer.delta_weight()) if cls.derives_from_weight else layer.base
            gen = None
            prev = old.shared_module()
            if prev is not None:
                if id(prev) not in fresh:
                    fresh[id(prev)] = cls.new_shared(layer.base, old.opts)
                gen = fresh[id(prev)]
            new = cls(ref, old.opts, gen)
            new.place(old.layer_role, old)
            if new.opts.interference == "project":
                new.basis = layer.memory.clone()
            old.freeze()
            if layer.folded is None:
                layer.folded = FoldedBranches(layer.base.weight)
            layer.folded.add(old, layer.base.weight)
            layer.adapter = new
            layer.experience_done = False
    return next(iter(layers.values())).frozen_count()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of every adapted layer except its frozen base: current and frozen branches, memory."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model).items():
        for key, value in layer.state_dict().items():
            if not key.startswith("base."):
                out[f"{name}.{key}"] = value.detach().clone()
    return out


def frozen_count(state: Mapping[str, torch.Tensor]) -> int:
    """How many frozen branches per layer a saved state holds (0 without stacking).

    A state written before branches were folded (``<layer>.frozen.<i>.…`` keys) is refused: ConfigError.
    """
    old = next((key for key in state if _UNFOLDED_KEY.search(key)), None)
    if old is not None:
        raise ConfigError(
            f"this saved state keeps one entry per stacked branch ('{old}'), the format avl-peft wrote before "
            "frozen branches were folded; this version cannot read it. Re-run the study (or restore it with the "
            "avl-peft version that wrote it and avl_peft.merge the model)"
        )
    found = [int(value) for key, value in state.items() if _COUNT_KEY.search(key)]
    return max(found) if found else 0


def resize_buffer(module: nn.Module, leaf: str, shape: torch.Size) -> None:
    """Give ``module``'s buffer ``leaf`` a saved ``shape`` (left empty: the state load fills it); buffers
    whose size grows with the stream (GPM bases, masks of grown heads) are sized this way before a load."""
    current = module._buffers.get(leaf)
    if current is not None and current.shape != shape:
        module._buffers[leaf] = torch.empty(shape, dtype=current.dtype, device=current.device)


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a saved state (e.g. a checkpoint's model tensors) into a model injected like the saved one.

    ``model`` has the same method, targets and options injected and has not been stacked further than the
    saved one. When the saved state has more frozen branches, this stacks the model once (the structure of
    any branch count), gives the folded terms and the ``basis``/``memory`` buffers the saved shapes, then
    loads ``state`` non-strictly (keys of other modules, such as the head, load too) — the same cost
    whatever the stream's length. Every saved adapter key must find a tensor of the same shape, or
    ConfigError.
    """
    layers = adapted_layers(model)
    if not layers:
        raise ConfigError("load_adapter_state: the model has no adapters; inject the saved method first")
    have = next(iter(layers.values())).frozen_count()
    want = frozen_count(state)
    if have > want:
        raise ConfigError(f"the model has {have} frozen branches per layer but the saved state only {want}")
    if want > have:
        stack(model)
    modules = dict(model.named_modules())
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if isinstance(modules.get(owner), FoldedBranches):
            modules[owner].resize(leaf, value.shape)
        elif owner in modules and leaf in (*_VARIABLE, *getattr(modules[owner], "variable_buffers", ())):
            resize_buffer(modules[owner], leaf, value.shape)
    own = model.state_dict()
    prefixes = tuple(f"{n}." for n in layers)
    missing = [k for k in state if k.startswith(prefixes) and k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or mismatched:
        detail = key_summary([("no such adapter tensor", missing), ("shape mismatch", mismatched)])
        raise ConfigError(f"saved adapter state does not fit this model ({detail})")
    model.load_state_dict(dict(state), strict=False)
    return model
