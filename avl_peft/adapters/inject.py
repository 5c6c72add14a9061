"""Injecting, inspecting and merging adapters: target matching, freezing, ΔW, parameter counts.

This is the one place that touches a model's module tree. ``inject`` swaps each matched ``nn.Linear``
for an :class:`~avl_peft.adapters.AdaptedLinear`, freezes the backbone and leaves the classifier head
trainable; ``merge`` folds every ΔW back into its weight and removes the wrappers.

What is frozen: the *backbone root* — the outermost timm model inside the model (a module with
``forward_features`` and ``reset_classifier``), or the whole model when there is none — except its
classifier head(s) and the modules declared ``trainable``. Modules outside the root (a wrapper's own
classifier, a projection head, ICaRL's/SCR's/FeatureReplay's parts) keep whatever ``requires_grad`` they
had. When injection freezes parameters that were trainable although the model already had a deliberate
trainable subset (e.g. a prompted ViT whose prompts train), or, without a timm root, a top-level module
that holds no target, a warning names those modules: declare them with ``trainable=[...]`` to keep them.

``lineage`` counts the changes made to the frozen backbone itself (each :func:`merge`, and the end of a
full-fine-tuning base session); checkpoints record it so that restoring them out of order is refused.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import METHODS, AdaptedLinear, Adapter, check_method, check_targets, parse_method_options
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
    targets = list(DEFAULT_TARGETS if targets is None else check_targets(targets))
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


def backbone_root(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the outermost timm model inside ``model`` (the model itself if it is one), else
    ("", model): the part injection freezes. timm models have ``forward_features`` and ``reset_classifier``."""
    for name, module in model.named_modules():  # pre-order: outermost first
        if _is_timm(module):
            return name, module
    return "", model


def _is_timm(module: nn.Module) -> bool:
    return callable(getattr(module, "forward_features", None)) and callable(getattr(module, "reset_classifier", None))


def _named(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _kept_trainable(model: nn.Module, trainable: list[str] | None) -> set[str]:
    """Parameter names that stay trainable: the heads (of the model and of its backbone root) and every
    module or parameter a ``trainable`` pattern names (ConfigError for a pattern that names nothing)."""
    root_name, root = backbone_root(model)
    heads = set(head_names(model)) | {_named(root_name, h) for h in head_names(root)}
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    owners = set(heads)
    for pattern in trainable or []:
        hits = [n for n in modules if n and matches(n, pattern)] + [n for n in params if matches(n, pattern)]
        if not hits:
            raise ConfigError(
                f"trainable {pattern!r} names no module or parameter of {type(model).__name__}; give dotted name "
                "suffixes or regexes of the modules that must keep training (e.g. 'train_classifier', 'prompt')"
            )
        owners.update(hits)
    return {n for n in params if any(n == o or n.startswith(o + ".") for o in owners)}


def check_trainable(trainable: Any) -> list[str] | None:
    if trainable is None:
        return None
    names = trainable if isinstance(trainable, (list, tuple)) else []
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ConfigError(f"trainable must be a non-empty list of module-name suffixes or regexes, got {trainable!r}")
    return list(trainable)


def _freeze_backbone(
    model: nn.Module, train_backbone: bool, trainable: list[str] | None = None, targets: dict[str, str] | None = None
) -> None:
    """Freeze the backbone root (or let it train), keep heads and ``trainable`` modules trainable; warn about
    trainable parameters frozen here that look like more than backbone (see the module docstring)."""
    root_name, root = backbone_root(model)
    keep = _kept_trainable(model, trainable)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    prefix = f"{root_name}." if root_name else ""
    root_params = {prefix + n for n, _ in root.named_parameters()}
    deliberate = not all(before[n] for n in root_params if n not in keep)
    for name, p in model.named_parameters():
        if name in root_params:
            p.requires_grad_(train_backbone or name in keep)
        elif name in keep:
            p.requires_grad_(True)
    if train_backbone:
        return
    frozen = [n for n, p in model.named_parameters() if before[n] and not p.requires_grad]
    if deliberate:
        suspicious = frozen
    elif not _is_timm(root) and targets:  # no timm root: top-level modules without a target are not backbone
        tops = {t.split(".")[0] for t in targets}
        suspicious = [n for n in frozen if n.split(".")[0] not in tops]
    else:
        suspicious = []
    if suspicious:
        owners = sorted({n.rpartition(".")[0] or n for n in suspicious})
        warnings.warn(
            f"injection froze trainable parameters of {', '.join(owners[:8])}{' …' if len(owners) > 8 else ''}; "
            "if they must keep training (a wrapper's classifier, prompts, a projection head), declare them: "
            "trainable=[...]",
            stacklevel=3,
        )


def check_injection(
    model: nn.Module,
    method: str,
    *,
    targets: list[str] | None = None,
    trainable: list[str] | None = None,
    **options: Any,
) -> dict[str, str]:
    """Everything ``inject`` would refuse, checked without touching ``model``: method, options, targets,
    rank against every target layer, ``trainable`` patterns. Returns the chosen layers (name -> target)."""
    cls = METHODS.get(method)
    check_trainable(trainable)
    _kept_trainable(model, trainable)
    opts = check_method(method, options, targets)
    if opts is None:
        return {}
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
    return chosen


def inject(
    model: nn.Module,
    method: str,
    *,
    targets: list[str] | None = None,
    trainable: list[str] | None = None,
    **options: Any,
) -> nn.Module:
    """Add ``method``'s adapters to ``model`` in place, freeze the backbone, keep the head trainable.

    ``targets``: dotted module-name suffixes (``attn.qkv``) or regexes (``blocks\\.[0-5]\\.attn\\.qkv``);
    default: every linear layer in the blocks. ``trainable``: modules (suffixes or regexes) inside the
    backbone that must keep training too (prompts, an extra classifier). ``options``: the method's options
    (``rank``, ``alpha``, ``dropout``, PiSSA ``svd_niter``, WeGeFT ``share``, LoRETTA ``tt_rank``/``init``).
    """
    if getattr(model, "avl_peft_injection", None) is not None:
        raise ConfigError(
            f"model already has '{model.avl_peft_injection['method']}' injected; call avl_peft.merge(model) first "
            "or start from a fresh model"
        )
    chosen = check_injection(model, method, targets=targets, trainable=trainable, **options)
    cls = METHODS.get(method)
    trainable = check_trainable(trainable)
    if not cls.adds_adapter:
        _freeze_backbone(model, cls.trains_backbone, trainable)
        model.avl_peft_injection = {"method": method, "targets": None, "options": {}, "trainable": trainable}
        return model

    opts = parse_method_options(cls.Options, method, options)
    modules = dict(model.named_modules())
    _freeze_backbone(model, False, trainable, chosen)
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
        adapter.place(cls.role(name, list(chosen), opts), None)
        _set_module(model, name, AdaptedLinear(base, adapter))
    model.avl_peft_injection = {
        "method": method,
        "targets": list(DEFAULT_TARGETS if targets is None else targets),
        "options": dict(options),
        "trainable": trainable,
    }
    return model


def lineage(model: nn.Module) -> int:
    """How many times the frozen backbone itself changed: merges plus ended full-fine-tuning sessions."""
    return int(getattr(model, "avl_peft_lineage", 0))


def _bump_lineage(model: nn.Module) -> None:
    model.avl_peft_lineage = lineage(model) + 1


def trains_backbone_marker(model: nn.Module) -> bool:
    """Whether ``model`` carries a baseline that trains the backbone (``full``, e.g. a base session)."""
    config = getattr(model, "avl_peft_injection", None)
    if config is None:
        return False
    cls = METHODS.get(config["method"])
    return cls.trains_backbone and not cls.adds_adapter


def end_full_training(model: nn.Module) -> None:
    """Close a full-fine-tuning phase: its weights become the frozen backbone (lineage + 1), marker removed."""
    if trains_backbone_marker(model):
        model.avl_peft_injection = None
        _bump_lineage(model)


def freeze_adapters(model: nn.Module) -> int:
    """Stop every branch of every adapted layer from training (``policy: first``); outputs do not change.
    Returns the number of parameters frozen."""
    frozen = 0
    for layer in adapted_layers(model).values():
        for p in layer.parameters():
            if p.requires_grad and p is not layer.base.weight and p is not layer.base.bias:
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


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
    if layers:
        _bump_lineage(model)
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
    """What is injected into ``model``: ``{"method", "targets" (None for baselines), "options", "trainable"}``
    or None. The one descriptor checkpoints, run states and restores use; :func:`reinject` rebuilds it."""
    config = getattr(model, "avl_peft_injection", None)
    return None if config is None else _normal(config)


def _normal(descriptor: dict[str, Any]) -> dict[str, Any]:
    """A descriptor with every key (older files have no ``trainable``), as plain lists and dicts."""
    targets, trainable = descriptor.get("targets"), descriptor.get("trainable")
    return {
        "method": descriptor["method"],
        "targets": None if targets is None else list(targets),
        "options": dict(descriptor.get("options") or {}),
        "trainable": None if trainable is None else list(trainable),
    }


def reinject(model: nn.Module, descriptor: dict[str, Any] | None, state: dict[str, torch.Tensor] | None = None) -> None:
    """Give a fresh ``model`` the structure ``descriptor`` describes, then load ``state`` (non-strict).

    The one re-injection path for methods and baselines: a baseline only sets what trains; an adapter
    method is injected with its targets and options, stacked to the saved number of frozen branches and
    its variable-size buffers (GPM bases) sized from ``state``. A baseline marker already on ``model``
    (``full`` during a base session) is replaced — ending a full-fine-tuning phase counts as a backbone
    change (:func:`lineage`); another adapter method is refused.
    """
    current = injection(model)
    if descriptor is not None:
        descriptor = _normal(descriptor)
    if descriptor is not None and current != descriptor:
        if current is not None and current["targets"] is not None:
            raise ConfigError(
                f"model has '{current['method']}' injected but the saved state holds '{descriptor['method']}'; "
                "merge(model) or start from a fresh model"
            )
        end_full_training(model)
        model.avl_peft_injection = None
        inject(
            model,
            descriptor["method"],
            targets=descriptor["targets"],
            trainable=descriptor["trainable"],
            **descriptor["options"],
        )
    if state is not None:
        if adapted_layers(model):
            load_adapter_state(model, state)
        else:
            model.load_state_dict(state, strict=False)
