"""Injecting, inspecting and merging adapters: target matching, freezing, ΔW, parameter counts.

This is the one place that touches a model's module tree. ``inject`` swaps each matched ``nn.Linear``
for an :class:`~avl_peft.adapters.AdaptedLinear`, freezes the backbone and leaves the classifier head
trainable; ``merge`` folds every ΔW back into its weight and removes the wrappers.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import METHODS, AdaptedLinear, Adapter, parse_options
from .stack import adapted_layers, load_adapter_state

# Every linear layer in a ViT block. Dotted suffixes: a bare "proj" would also name the patch
# embedding's Conv2d (patch_embed.proj).
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_REGEX_CHARS = set("^$*+?[](){}|\\")


def methods() -> list[str]:
    """Names of every registered method (adapters and the ``full``/``head`` baselines)."""
    return METHODS.names()


def head_names(model: nn.Module) -> list[str]:
    """Module names of the classifier head (timm's pretrained_cfg['classifier'], else 'head')."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier", "head")
    names = [names] if isinstance(names, str) else list(names)
    present = dict(model.named_modules())
    return [n for n in names if n in present]


def matches(name: str, target: str) -> bool:
    if _REGEX_CHARS & set(target):
        return re.fullmatch(target, name) is not None
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: list[str] | tuple[str, ...] | None = None) -> dict[str, str]:
    """Map module name -> the target that selected it. Validates every target matches a Linear."""
    targets = list(DEFAULT_TARGETS if targets is None else targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"targets must be a non-empty list of module-name suffixes or regexes, got {targets!r}")
    for t in targets:
        if _REGEX_CHARS & set(t):
            try:
                re.compile(t)
            except re.error as e:
                raise ConfigError(f"target {t!r} is not a valid regular expression: {e}") from None
    heads = set(head_names(model))
    chosen: dict[str, str] = {}
    linear_names = []
    for t in targets:
        hits = 0
        for name, mod in model.named_modules():
            if not name or not matches(name, t):
                continue
            if isinstance(mod, AdaptedLinear):
                raise ConfigError(f"module '{name}' already has an adapter; call merge(model) before injecting again")
            if not isinstance(mod, nn.Linear):
                if _REGEX_CHARS & set(t) and any(True for _ in mod.children()):
                    continue  # a broad regex also names containers (blocks.0.mlp); only leaves count
                raise ConfigError(
                    f"target {t!r} matches '{name}', a {type(mod).__name__}, but only nn.Linear layers can be "
                    f"adapted. Use a dotted suffix that names only linear layers (e.g. 'attn.proj', not 'proj')."
                )
            if name in heads:
                raise ConfigError(
                    f"target {t!r} matches the classifier head '{name}', which always trains fully; remove it"
                )
            chosen.setdefault(name, t)
            hits += 1
        if hits == 0:
            linear_names = linear_names or [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            example = ", ".join(linear_names[:6])
            raise ConfigError(
                f"target {t!r} matches no nn.Linear in {type(model).__name__}. Linear layers look like: {example}"
                f"{' …' if len(linear_names) > 6 else ''}. Targets are dotted name suffixes or regexes."
            )
    return chosen


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _freeze_backbone(model: nn.Module, train_backbone: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(train_backbone)
    for h in head_names(model):
        for p in model.get_submodule(h).parameters():
            p.requires_grad_(True)


def inject(model: nn.Module, method: str, *, targets: list[str] | None = None, **options: Any) -> nn.Module:
    """Add ``method``'s adapters to ``model`` in place, freeze the backbone, keep the head trainable.

    ``targets``: dotted module-name suffixes (``attn.qkv``) or regexes (``blocks\\.[0-5]\\.attn\\.qkv``);
    default: every linear layer in the blocks. ``options``: the method's options (``rank``, ``alpha``,
    ``dropout``, PiSSA ``svd_niter``, WeGeFT ``share``, LoRETTA ``tt_rank``/``init``).
    """
    if getattr(model, "avl_peft_injection", None) is not None:
        raise ConfigError(
            f"model already has '{model.avl_peft_injection['method']}' injected; call avl_peft.merge(model) first "
            "or start from a fresh model"
        )
    cls = METHODS.get(method)
    if not cls.adds_adapter:
        if options or targets is not None:
            given = sorted(options) + (["targets"] if targets is not None else [])
            raise ConfigError(f"method '{method}' takes no options, got {', '.join(given)}")
        _freeze_backbone(model, cls.trains_backbone)
        model.avl_peft_injection = {"method": method, "targets": None, "options": {}}
        return model

    opts = parse_options(cls.Options, method, options)
    chosen = find_targets(model, targets)
    modules = dict(model.named_modules())
    for name in chosen:
        d_out, d_in = modules[name].weight.shape
        limit = cls.max_rank(d_out, d_in)
        if opts.rank > limit:
            raise ConfigError(
                f"rank {opts.rank} is too large for layer '{name}' ({d_out}×{d_in}): {method} allows at most "
                f"{limit} there. Lower rank or leave that layer out of targets."
            )
    _freeze_backbone(model, False)
    shared: dict[tuple[str, int], nn.Module] = {}
    share = cls.shared and getattr(opts, "share", False)
    for name, target in chosen.items():
        base = modules[name]
        gen = None
        if share:
            key = (target, base.in_features)
            if key not in shared:
                shared[key] = cls.new_shared(base, opts)
            gen = shared[key]
        adapter: Adapter = cls(base, opts, gen)
        _set_module(model, name, AdaptedLinear(base, adapter))
    model.avl_peft_injection = {
        "method": method,
        "targets": list(DEFAULT_TARGETS if targets is None else targets),
        "options": dict(options),
    }
    return model


def delta_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Dense ΔW of every adapted Linear, keyed by module name, shaped like its weight."""
    return {n: m.delta_weight() for n, m in adapted_layers(model).items()}


def merge(model: nn.Module) -> nn.Module:
    """Fold every ΔW into its weight and remove the adapters (one-way). Weights stay frozen."""
    layers = adapted_layers(model)
    with torch.no_grad():
        # All ΔW first: WeGeFT's ΔW reads W, and a shared generator must see unmerged weights everywhere.
        deltas = {n: m.delta_weight() for n, m in layers.items()}
        for name, layer in layers.items():
            layer.base.weight.add_(deltas[name].to(layer.base.weight.dtype))
            _set_module(model, name, layer.base)
    model.avl_peft_injection = None
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Exact counts of unique parameters: trainable, total, and those inside adapters."""
    params = {id(p): p for p in model.parameters()}.values()
    adapter = {id(p): p for m in adapted_layers(model).values() for p in m.adapter.parameters()}
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
        "adapter": sum(p.numel() for p in adapter.values()),
    }


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What distinguishes this model from its frozen backbone: adapter tensors and trainable weights."""
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in trainable or ".adapter." in k}


def injection(model: nn.Module) -> dict[str, Any] | None:
    """What is injected into ``model``: ``{"method", "targets" (None for baselines), "options"}`` or None.

    The one descriptor checkpoints, run states and restores use; :func:`reinject` rebuilds it.
    """
    config = getattr(model, "avl_peft_injection", None)
    if config is None:
        return None
    return {
        "method": config["method"],
        "targets": None if config["targets"] is None else list(config["targets"]),
        "options": dict(config["options"]),
    }


def reinject(model: nn.Module, descriptor: dict[str, Any] | None, state: dict[str, torch.Tensor] | None = None) -> None:
    """Give a fresh ``model`` the structure ``descriptor`` describes, then load ``state`` (non-strict).

    The one re-injection path for methods and baselines: a baseline only sets what trains; an adapter
    method is injected with its targets and options, stacked to the saved number of frozen branches and
    its variable-size buffers (GPM bases) sized from ``state``. A baseline marker already on ``model``
    (``full`` during a base session) is replaced; another adapter method is refused.
    """
    current = injection(model)
    if descriptor is not None and current != descriptor:
        if current is not None and current["targets"] is not None:
            raise ConfigError(
                f"model has '{current['method']}' injected but the saved state holds '{descriptor['method']}'; "
                "merge(model) or start from a fresh model"
            )
        model.avl_peft_injection = None
        inject(model, descriptor["method"], targets=descriptor["targets"], **descriptor["options"])
    if state is not None:
        if adapted_layers(model):
            load_adapter_state(model, state)
        else:
            model.load_state_dict(state, strict=False)
