"""Equal-budget comparisons: the largest adapter of each method that fits a parameter budget.

``select_for_budget("lora", 50_000, backbone_model=m)`` returns ``{"rank": r, "adapter_params": n}``
with n the largest adapter parameter count not above the budget (LoRETTA also chooses ``tt_rank``).
Counts are exact: each method's adapters are built on the ``meta`` device (no memory, no SVD) for every
distinct target-layer shape exactly as :func:`avl_peft.inject` builds them, including WeGeFT's
generators shared per target type, and counted as ``parameter_counts(model)["adapter"]`` counts them
(unique trainable adapter parameters; PiSSA's frozen A₀, B₀ are buffers, not parameters).

Each method's registry entry says what to search (:attr:`~.base.Adapter.budget_knobs`,
:meth:`~.base.Adapter.budget_candidates`): by default rank 1 … the largest rank every target layer allows,
binary-searched since counts grow with rank; a method whose count is not monotone
(``budget_monotone = False``, e.g. LoRETTA's rank × tt_rank) has every candidate counted. A method with a
:meth:`~.base.Adapter.closed_form_count` is counted by formula and the answer re-checked on built modules.
Ties: larger count, then larger rank, then the earlier candidate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..validate import is_int
from .base import METHODS, parse_method_options
from .inject import find_targets


def adapter_methods() -> list[str]:
    """Registered methods that can be budgeted (they add adapters; not the ``full``/``head`` baselines)."""
    return [m for m in METHODS.names() if METHODS.get(m).budget_knobs]


def _target_layers(model: nn.Module, targets: list[str] | None) -> list[tuple[str, str, int, int]]:
    """(target, module name, d_out, d_in) of every layer ``inject`` would wrap, in module order."""
    chosen = find_targets(model, targets)
    modules = dict(model.named_modules())
    return [(target, name, *modules[name].weight.shape) for name, target in chosen.items()]


def _freeze(options: dict[str, Any]) -> tuple:
    return tuple(sorted(options.items()))


@lru_cache(maxsize=8192)
def _own_params(
    method: str, d_out: int, d_in: int, frozen_opts: tuple, shared: bool, fast: bool = True, role: str = ""
) -> tuple[int, int]:
    """(parameters of one adapter not in a shared generator, parameters of one shared generator)."""
    cls = METHODS.get(method)
    opts = parse_method_options(cls.Options, method, dict(frozen_opts))
    closed = cls.closed_form_count(d_out, d_in, opts) if fast and not shared else None
    if closed is not None:
        return closed, 0
    layer = nn.Linear(d_in, d_out, device="meta")
    gen = cls.new_shared(layer, opts) if shared else None
    adapter = cls(layer, opts, gen)
    adapter.place(role, None)  # as inject does: a method may size its branch by the layer's role
    gen_ids = {id(p) for p in gen.parameters()} if gen is not None else set()
    own = {id(p): p for p in adapter.parameters() if id(p) not in gen_ids}
    return sum(p.numel() for p in own.values()), sum(p.numel() for p in gen.parameters()) if gen is not None else 0


def count_adapter_params(
    method: str, *, backbone_model: nn.Module, targets: list[str] | None = None, **options: Any
) -> int:
    """Exactly ``parameter_counts(inject(copy, method, targets=targets, **options))["adapter"]``,
    without touching ``backbone_model`` or allocating the adapters."""
    return _count(method, _target_layers(backbone_model, targets), options)


def _count(method: str, layers: list[tuple[str, str, int, int]], options: dict[str, Any], fast: bool = True) -> int:
    cls = METHODS.get(method)
    if not cls.budget_knobs:
        raise ConfigError(f"method '{method}' adds no adapter; parameter budgets apply to adapter methods only")
    opts = parse_method_options(cls.Options, method, options)  # validates names and values
    for _, _, d_out, d_in in layers:
        limit = cls.max_rank(d_out, d_in)
        if opts.rank > limit:
            raise ConfigError(
                f"rank {opts.rank} is too large for a {d_out}×{d_in} layer: {method} allows at most {limit}"
            )
    frozen = _freeze(dataclasses.asdict(opts))
    share = bool(cls.shared and getattr(opts, "share", False))
    total, groups = 0, set()
    names = [name for _, name, _, _ in layers]
    for target, name, d_out, d_in in layers:
        own, gen = _own_params(method, d_out, d_in, frozen, share, fast, cls.role(name, names, opts))
        total += own
        if share and (target, d_in) not in groups:  # inject shares one generator per (target, d_in)
            groups.add((target, d_in))
            total += gen
    return total


def _candidates(method: str, layers: list[tuple[str, str, int, int]], fixed: dict[str, Any]) -> list[dict[str, int]]:
    cls = METHODS.get(method)
    max_rank = min(cls.max_rank(d_out, d_in) for _, _, d_out, d_in in layers)
    return cls.budget_candidates(max_rank, fixed)


def _monotone(method: str) -> bool:
    return METHODS.get(method).budget_monotone


def select_for_budget(
    method: str,
    budget: int,
    *,
    backbone_model: nn.Module,
    targets: list[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The ``method`` options whose adapter parameter count is the largest not above ``budget``.

    Returns the options to pass to :func:`avl_peft.inject` / ``method.options`` — ``{"rank": r}``
    (LoRETTA: ``{"rank": r, "tt_rank": t}``), plus any fixed ``options`` given (e.g. ``share=False``,
    ``alpha``; a given ``rank``/``tt_rank`` is kept and only the other is searched) — and
    ``"adapter_params"``, the exact count. ``full``/``head`` have no budget: ConfigError. A budget below
    the method's smallest adapter: ConfigError naming that minimum.
    """
    cls = METHODS.get(method)
    if not cls.budget_knobs:
        raise ConfigError(
            f"method '{method}' has no parameter budget (it adds no adapter); choose one of "
            f"{', '.join(adapter_methods())}"
        )
    if not is_int(budget) or budget <= 0:
        raise ConfigError(f"budget must be a positive integer number of parameters, got {budget!r}")
    fixed = dict(options)
    parse_method_options(cls.Options, method, fixed)  # unknown or invalid fixed options fail here, by name
    layers = _target_layers(backbone_model, targets)
    candidates = _candidates(method, layers, fixed)

    def counter(fast: bool):
        return lambda c: _count(method, layers, {**fixed, **c}, fast)

    count = counter(True)
    chosen = _search(method, budget, candidates, count)
    if chosen is not None and count(chosen) != counter(False)(chosen):
        count = counter(False)  # the closed form disagrees with the built modules: trust the modules
        chosen = _search(method, budget, candidates, count)
    if chosen is None:
        smallest = candidates[0] if _monotone(method) else min(candidates, key=count)
        raise ConfigError(
            f"budget {budget:,} is below the smallest {method} adapter on these targets: {count(smallest):,} "
            f"parameters ({', '.join(f'{k}={v}' for k, v in smallest.items())}). Raise the budget or target "
            "fewer layers."
        )
    return {**fixed, **chosen, "adapter_params": count(chosen)}


def _search(
    method: str, budget: int, candidates: list[dict[str, int]], count: Callable[[dict[str, int]], int]
) -> dict[str, int] | None:
    """The candidate with the largest count not above budget (ties: larger rank, then the earlier one)."""
    if _monotone(method):  # counts grow with rank: binary search for the last candidate that fits
        if count(candidates[0]) > budget:
            return None
        lo, hi = 0, len(candidates) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(candidates[mid]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return candidates[lo]
    best: tuple[tuple[int, int, int], dict[str, int]] | None = None
    for c in candidates:
        n = count(c)
        key = (n, c.get("rank", 0))
        if n <= budget and (best is None or key > best[0]):
            best = (key, c)
    return None if best is None else best[1]


def budget_table(backbone_model: nn.Module, budget: int, targets: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per adapter method: ``{"method", "options", "adapter_params", "error"}`` at ``budget``.

    A method whose smallest adapter exceeds the budget gets ``options``/``adapter_params`` None and the
    reason in ``error`` (None otherwise).
    """
    rows = []
    for method in adapter_methods():
        try:
            chosen = select_for_budget(method, budget, backbone_model=backbone_model, targets=targets)
        except ConfigError as e:
            if "below the smallest" not in str(e):
                raise
            rows.append({"method": method, "options": None, "adapter_params": None, "error": str(e)})
            continue
        n = chosen.pop("adapter_params")
        rows.append({"method": method, "options": chosen, "adapter_params": n, "error": None})
    return rows
