"""The adapter contract and the one wrapper around ``nn.Linear`` that every method shares.

A target layer computes ``y = W x + b`` with ``W`` of shape (d_out, d_in). An adapter (a *branch*) defines
a dense update ``ΔW`` (:meth:`Adapter.delta_weight`, the specification), the same update in factored form
``ΔW = L R`` (:meth:`Adapter.factors`, L (d_out, q), R (q, d_in)) and a forward pass that must equal
``F.linear(x, W + ΔW, b)`` but may be computed faster without materialising ``ΔW``
(:meth:`Adapter.forward`, an optimisation tied to the dense path by the tests).

Interference control (options shared by every method, see :class:`AdapterOptions`):

* ``project``: a branch may be confined to the orthogonal complement of a basis M (d_in, k) of earlier
  experiences' layer inputs, ``ΔW_conf = ΔW (I − M Mᵀ)``. Every method enters the input only through its
  input-side factor R, so confining R (``R − (R M) Mᵀ``, a q × d_in × k product) confines ΔW exactly and
  costs nothing per token — cheaper than projecting every input ``x − M (Mᵀ x)``.
* ``orthogonal``: a loss term between the current branch's input factor and the frozen branches' ones
  (see :mod:`avl_peft.adapters.interference`).

:class:`AdaptedLinear` holds the current (trainable) branch in ``adapter`` and, under ``policy: stack``,
the branches of earlier experiences folded into ``folded`` (see :mod:`avl_peft.adapters.stack` and
:mod:`avl_peft.adapters.fold`): ``y = W x + b + (Σ_{frozen} ΔW_i) x + ΔW_current x``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..options import parse_options
from ..registry import Registry, suggest
from ..validate import is_finite, is_int, is_number

METHODS: Registry[type] = Registry("method")

INTERFERENCE = ("none", "orthogonal", "project")
ALPHA_POLICIES = ("rank", "constant", "rslora")  # how the update's scale s follows the rank (AdapterOptions)
# A layer's earlier (frozen) branches as one term of its weight: a low-rank pair (L₀ (d_out, q₀), R₀ (q₀, d_in)),
# or the dense sum (d_out, d_in) once that is smaller (see fold.py).
Frozen = tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None


@dataclasses.dataclass
class AdapterOptions:
    """Options every low-rank method accepts. Subclasses add their own fields."""

    rank: int = 8  # r: the size of the update subspace; 8 is the study's mid-range default
    alpha: float | None = None  # α of the scale s (see alpha_policy); None means α = r (s = 1), the study's choice
    # How the scale s follows the rank (ALPHA_POLICIES): rank (α = r, s = 1), constant (s = α/r: a larger rank
    # takes smaller steps per direction), rslora (s = α/√r, Kalajdzievski 2023, arXiv 2312.03732: the step
    # size stays stable across ranks). None: rank without alpha, constant with it (the behaviour before).
    alpha_policy: str | None = None
    dropout: float = 0.0  # dropout on the adapter path's input; 0 keeps runs deterministic and fast
    interference: str = "none"  # none | orthogonal (O-LoRA loss term) | project (GPM/InfLoRA confinement)
    # λ of the orthogonal penalty; the option key is ``lambda`` (a Python keyword, hence the field name).
    # The penalty's size depends on the factors' scale, so this is a starting point to tune.
    orth_lambda: float = 0.5
    gpm_threshold: float = 0.97  # energy the kept input subspace must explain (GPM's ε_th)

    ALIASES: ClassVar[dict[str, str]] = {"orth_lambda": "lambda"}  # field -> the key users write

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and (not is_number(self.alpha) or self.alpha <= 0):
            raise ConfigError(f"alpha must be a positive number (or null for alpha = rank), got {self.alpha!r}")
        if self.alpha_policy is not None and self.alpha_policy not in ALPHA_POLICIES:
            raise ConfigError(
                f"alpha_policy must be one of {', '.join(ALPHA_POLICIES)}, got {self.alpha_policy!r}"
                f"{suggest(str(self.alpha_policy), list(ALPHA_POLICIES))}"
            )
        if self.alpha_policy == "rank" and self.alpha is not None:
            raise ConfigError(
                f"alpha_policy: rank sets alpha = rank, so alpha: {self.alpha} would be ignored; drop alpha, or use "
                "alpha_policy: constant (s = alpha/rank) or rslora (s = alpha/sqrt(rank))"
            )
        if self.alpha_policy in ("constant", "rslora") and self.alpha is None:
            raise ConfigError(
                f"alpha_policy: {self.alpha_policy} needs alpha (the numerator of its scale), e.g. alpha: 8"
            )
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.interference not in INTERFERENCE:
            raise ConfigError(
                f"interference must be one of {', '.join(INTERFERENCE)}, got {self.interference!r}"
                f"{suggest(str(self.interference), list(INTERFERENCE))}"
            )
        if not is_finite(self.orth_lambda) or self.orth_lambda < 0:
            raise ConfigError(f"lambda (the orthogonal penalty weight) must be a number >= 0, got {self.orth_lambda!r}")
        if not is_finite(self.gpm_threshold) or not 0.0 < self.gpm_threshold <= 1.0:
            raise ConfigError(f"gpm_threshold must be a number in (0, 1], got {self.gpm_threshold!r}")

    @property
    def resolved_alpha_policy(self) -> str:
        """The policy in force: ``alpha_policy``, or rank / constant by whether alpha is given."""
        return self.alpha_policy or ("rank" if self.alpha is None else "constant")

    @property
    def scale(self) -> float:
        """The factor s of every method's update ΔW = s · (its low-rank product), from alpha_policy."""
        policy = self.resolved_alpha_policy
        if policy == "rank":
            return 1.0  # α = r
        if policy == "rslora":
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def scaling(self) -> dict[str, Any]:
        """What results.json records of the scale: the policy, α (as resolved) and s."""
        policy = self.resolved_alpha_policy
        return {"alpha_policy": policy, "alpha": self.rank if policy == "rank" else self.alpha, "scale": self.scale}


def parse_method_options(cls: type, method: str, options: dict[str, Any]) -> Any:
    """Build a method's options dataclass, turning unknown keys into an actionable ConfigError.

    ``lambda`` is accepted for ``orth_lambda`` (the dataclass' ``ALIASES``); giving both is an error.
    """
    return parse_options(cls, f"method '{method}'", options)


def check_targets(targets: Any) -> Any:
    """The one check of ``targets`` (None: the defaults): a non-empty list of non-empty strings."""
    if targets is not None and (
        not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets)
    ):
        raise ConfigError(f"targets must be a non-empty list of module-name suffixes or regexes, got {targets!r}")
    return targets


def check_method(method: str, options: dict[str, Any], targets: Any = None, init_from: Any = None) -> Any:
    """The method-level rules, checked once here for the config, the plugin and ``inject``: the method
    exists, takes these options (baselines take none, nor targets), targets are well-formed, and it can
    start from a peft LoRA when ``init_from`` is given. Returns the parsed options (None for baselines)."""
    cls = METHODS.get(method)
    if init_from is not None and not getattr(cls, "imports_lora", False):
        able = [m for m in METHODS.names() if getattr(METHODS.get(m), "imports_lora", False)]
        raise ConfigError(
            f"method.init_from: method '{method}' cannot start from a peft LoRA; methods that can: {', '.join(able)}"
        )
    check_targets(targets)
    if not cls.adds_adapter:
        if options or targets is not None:
            given = sorted(options) + (["targets"] if targets is not None else [])
            raise ConfigError(f"method '{method}' takes no options, got {', '.join(given)}")
        return None
    return parse_method_options(cls.Options, method, options)


class WeightView:
    """Stands in for an ``nn.Linear`` where a constructor only reads ``.weight`` (shape, dtype, device, values).

    :func:`~avl_peft.adapters.stack.stack` uses it to build PiSSA's next branch on the effective weight.
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


class Adapter(nn.Module):
    """Base class of a low-rank update (one branch) attached to one ``nn.Linear``.

    Subclasses set ``Options`` and implement ``delta_weight(weight)``, ``factors(weight)`` and
    ``input_factor()``, applying :meth:`confine` to their input side; they override ``forward`` with a
    factored pass when one exists. ``weight`` is always passed in (never stored), so an adapter never holds
    a second reference to the frozen backbone.

    ``basis`` (d_in, k), a buffer: the subspace this branch is confined away from (k = 0: unconfined). It is
    set when the branch starts (``interference: project``) and never changes afterwards, so a frozen branch
    keeps computing exactly the update it was trained as.
    """

    # --- capabilities: what the rest of the package reads off a registry entry (never its name) ---
    Options: ClassVar[type[AdapterOptions]] = AdapterOptions
    adds_adapter: ClassVar[bool] = True  # False for the full/head baselines
    trains_backbone: ClassVar[bool] = False  # True for full fine-tuning
    budget_knobs: ClassVar[tuple[str, ...]] = ("rank",)  # options an equal-budget comparison chooses
    budget_monotone: ClassVar[bool] = True  # adapter size grows with every knob: binary search is exact
    requires_stack: ClassVar[bool] = False  # one branch per experience by design (needs policy: stack)
    # buffers whose size grows with the stream (resized to the saved shape when a state is restored)
    variable_buffers: ClassVar[tuple[str, ...]] = ()
    # Adapters of one type that share parameters across layers (WeGeFT) fill this per injection.
    shared: ClassVar[bool] = False
    # PiSSA: a stacked branch is re-derived from the layer's effective weight W + ΣΔW (see stack.py).
    derives_from_weight: ClassVar[bool] = False
    # Can start from a peft LoRA pair (method.init_from, see peft_init.py): implements set_lora.
    imports_lora: ClassVar[bool] = False

    def __init__(self, layer: nn.Linear, opts: AdapterOptions, shared: nn.Module | None = None):
        super().__init__()
        self.opts = opts
        self.scale = opts.scale
        self.drop = nn.Dropout(opts.dropout) if opts.dropout > 0 else nn.Identity()
        w = layer.weight
        self.register_buffer("basis", torch.empty(w.shape[1], 0, dtype=w.dtype, device=w.device))
        self.layer_role = ""  # set by place()

    @staticmethod
    def max_rank(d_out: int, d_in: int) -> int:
        return min(d_out, d_in)

    @classmethod
    def capabilities(cls) -> list[str]:
        """Short tags for ``avl-peft list``."""
        tags = [f"budget: {', '.join(cls.budget_knobs)}"] if cls.budget_knobs else []
        return tags + (["needs policy: stack"] if cls.requires_stack else [])

    @staticmethod
    def new_shared(layer: nn.Linear, opts: AdapterOptions) -> nn.Module | None:
        """The module shared by every layer of one target type (``shared`` methods); None otherwise."""
        return None

    @classmethod
    def budget_candidates(cls, max_rank: int, fixed: dict[str, Any]) -> list[dict[str, int]]:
        """Every setting of :attr:`budget_knobs` the budget search considers, smallest first."""
        ranks = [fixed["rank"]] if "rank" in fixed else range(1, max_rank + 1)
        return [{"rank": r} for r in ranks]

    @staticmethod
    def closed_form_count(d_out: int, d_in: int, opts: AdapterOptions) -> int | None:
        """Parameters of one (unshared) adapter without building it, where building is too slow to search."""
        return None

    @property
    def needs_memory(self) -> bool:
        """Whether the layer must keep a GPM basis of input features for this method (project, InfLoRA)."""
        return self.opts.interference == "project"

    def confine(self, t: torch.Tensor) -> torch.Tensor:
        """t (I − M Mᵀ) for t (..., d_in): removes the component of t's rows in span(basis)."""
        m = self.basis
        if m.shape[1] == 0:
            return t
        # In the basis' precision even under autocast: a bf16 projection would leave ~1e-2 of span(M).
        with torch.autocast(t.device.type, enabled=False):
            t32 = t.to(m.dtype)
            return (t32 - (t32 @ m) @ m.t()).to(t.dtype)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:  # (d_out, d_in)
        raise NotImplementedError

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L (d_out, q), R (q, d_in)) with L R = delta_weight(weight); R already confined."""
        raise NotImplementedError

    def set_lora(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Start from the update ``scale · b a`` (a peft LoRA pair); only methods with ``imports_lora``."""
        raise NotImplementedError

    def input_factor(self) -> torch.Tensor:
        """The update's input-side factor (q, d_in) whose rows the orthogonal penalty compares."""
        raise NotImplementedError

    def factor_owner(self) -> nn.Module:
        """The module owning :meth:`input_factor` (a shared WeGeFT generator), so penalties count it once."""
        return self

    def shared_module(self) -> nn.Module | None:
        """The parameters this branch shares with other layers' branches, or None."""
        return None

    @classmethod
    def role(cls, name: str, names: list[str], opts: AdapterOptions) -> str:
        """The part layer ``name`` plays for this method among every adapted layer ``names`` ("" for all but
        methods whose branches differ by position, e.g. CL-LoRA's task-shared and task-specific blocks)."""
        return ""

    def place(self, role: str, previous: Adapter | None) -> None:
        """Called right after construction with the layer's :meth:`role`: by ``inject`` (``previous`` None),
        by ``stack`` (the branch this one follows) and by the budget count. Methods override to change their
        parameters by role; they must call this base version, which records the role."""
        self.layer_role = role

    @classmethod
    def model_loss(cls, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """A loss term of the whole adapted model on the training batch ``x``, added to the strategy's loss
        (CL-LoRA's distillation); None for methods without one."""
        return None

    def begin(self, inputs: torch.Tensor | None, memory: torch.Tensor) -> None:
        """Called before the branch trains, with the layer's collected inputs (n, d_in) and GPM basis."""

    def freeze(self) -> None:
        """Make this branch a frozen earlier branch (stacking): nothing of it trains any more."""
        for p in self.parameters():
            p.requires_grad_(False)

    def fold_parts(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A frozen branch as (L, R, magnitude): ΔW = L R, or magnitude · L R where the magnitude keeps
        training after freezing (SD-LoRA); magnitude None means the branch is a constant (see fold.py)."""
        left, right = self.factors(weight)
        return left, right, None

    def forward(self, x: torch.Tensor, layer: nn.Linear, frozen: Frozen = None) -> torch.Tensor:
        """y = (W + L₀R₀ + ΔW) x + b; ``frozen`` = (L₀, R₀) or a dense L₀R₀, the layer's earlier branches, or None.

        Dense reference path; subclasses override with a factored equivalent that passes ``frozen`` on to
        :func:`~avl_peft.adapters._lowrank.low_rank_linear`.
        """
        w = layer.weight + self.delta_weight(layer.weight)
        if isinstance(frozen, torch.Tensor):
            return F.linear(x, w + frozen, layer.bias)
        return F.linear(x, w + frozen[0] @ frozen[1] if frozen is not None else w, layer.bias)


class AdaptedLinear(nn.Module):
    """An ``nn.Linear`` plus its branches: ``y = (W + Σ_frozen ΔW_i + ΔW_current) x + b``.

    ``adapter`` is the current branch, ``folded`` the earlier ones (None unless stacked), ``memory``
    (d_in, k) the GPM basis of earlier experiences' inputs (a buffer, k = 0 until an experience ends with
    ``interference: project`` or InfLoRA). The only wrapper in avl-peft.
    """

    def __init__(self, base: nn.Linear, adapter: Adapter):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.register_module("folded", None)  # a FoldedBranches once stack() freezes the first branch
        w = base.weight
        self.register_buffer("memory", torch.empty(w.shape[1], 0, dtype=w.dtype, device=w.device))
        # Set by end_experience, cleared by stack: a branch that finished an experience must not restart.
        self.experience_done = False

    @property
    def weight(self) -> torch.Tensor:  # timm code sometimes reads .weight (e.g. dtype checks)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def frozen_count(self) -> int:
        """How many earlier branches are folded into this layer (0 without stacking)."""
        return 0 if self.folded is None else int(self.folded.count)

    def update_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layer's whole update as (L, R) pairs, L R summing to :meth:`delta_weight`: the folded earlier
        branches (a dense sum as its SVD factors U S, Vᵀ: exact, rank ≤ min(d_out, d_in)), then the current one."""
        w = self.base.weight
        term = None if self.folded is None else self.folded.term()
        if isinstance(term, torch.Tensor):
            u, s, vh = torch.linalg.svd(term.detach().double(), full_matrices=False)
            term = ((u * s).to(w.dtype), vh.to(w.dtype))
        return ([] if term is None else [term]) + [self.adapter.factors(w)]

    def delta_weight(self) -> torch.Tensor:
        delta = self.adapter.delta_weight(self.base.weight)
        return delta if self.folded is None else delta + self.folded.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if base._forward_pre_hooks or base._forward_hooks:
            return self._forward_with_base_hooks(x)
        return self._forward(x)

    def _forward_with_base_hooks(self, x: torch.Tensor) -> torch.Tensor:
        """Run the forward (pre-)hooks registered on the wrapped ``nn.Linear`` around the adapted forward.

        The wrapper replaced that layer in the model, so hooks users (or Avalanche's MAC metric) put on it
        before or after injection would otherwise never fire. They see the Linear as their module, its
        input, and the adapted output ((W + ΔW) x + b). Backward hooks on the Linear are not carried over.
        """
        base = self.base
        args: tuple[Any, ...] = (x,)
        for key, hook in list(base._forward_pre_hooks.items()):
            if key in base._forward_pre_hooks_with_kwargs:
                result = hook(base, args, {})
                if result is not None:
                    args = result[0]
            else:
                result = hook(base, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        out = self._forward(*args)
        for key, hook in list(base._forward_hooks.items()):
            if key in base._forward_hooks_with_kwargs:
                result = hook(base, args, {}, out)
            else:
                result = hook(base, args, out)
            if result is not None:
                out = result
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # Earlier branches as one term of the weight; they see the clean input (no dropout): they are part of
        # the model function now, exactly as if merged. The current branch folds them into its fused node
        # (one GEMM with W + L₀R₀ + ΔW when that pays).
        frozen = self.folded.term() if self.folded is not None else None
        return self.adapter(x, self.base, frozen)

    def merged(self) -> nn.Linear:
        """The base layer with every branch's ΔW folded into its weight (one-way)."""
        with torch.no_grad():
            self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        return self.base


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (kaiming-uniform, a=sqrt(5)) as LoRA uses for A."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))
