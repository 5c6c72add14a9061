"""The subspace tracker: an Avalanche plugin that measures the update geometry after every experience.

Notation and formulas: :mod:`avl_peft.instruments.geometry` (and docs/design.md). A target layer's
reference weight is W₀; after experience t its effective weight is W_t = base weight + ΔW, the cumulative
update C_t = W_t − W₀ and the increment I_t = C_t − C_{t−1}. Per-layer values are averaged over layers (a
layer whose overlap is undefined is left out of that mean).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.logging import TensorboardLogger
from torch import nn

from ..adapters import AdaptedLinear
from ..adapters.inject import DEFAULT_TARGETS, head_names, matches
from ..errors import ConfigError
from .geometry import (
    check_k,
    feature_drift,
    orthonormalize,
    principal_energy_in,
    principal_overlap,
    relative_norm,
    stable_rank_from,
    top_singular,
)

# Layer-averaged values in every record (and TensorBoard tags subspace/<name>).
METRICS = (
    "overlap",
    "input_overlap",
    "alignment",
    "principal_energy",
    "effective_rank",
    "relative_norm",
    "feature_drift",
)
OPTIONAL = ("overlap", "input_overlap")  # undefined (None) at the first experience
LAYER_METRICS = METRICS[:-1]


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """(base weight + ΔW) of an adapted layer, the weight of a plain Linear; float32, no grad."""
    if isinstance(module, AdaptedLinear):
        return module.base.weight.detach().float() + module.delta_weight().detach().float()
    return module.weight.detach().float()


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class _Layer:
    """What the tracker keeps per layer: W₀ (and its top-k bases), C_{t−1}, the span of increments."""

    __slots__ = ("w0", "w0_norm", "u0", "v0", "prev", "span", "span_in")

    def __init__(self, w0: torch.Tensor):
        self.w0 = w0
        self.w0_norm = float(w0.norm())
        self.u0: torch.Tensor | None = None
        self.v0: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None  # cumulative update after the previous experience
        self.span: torch.Tensor | None = None  # orthonormal basis of earlier increments' top-k spans
        self.span_in: torch.Tensor | None = None  # the same on the input side (right singular vectors)


@contextlib.contextmanager
def _own_rng():
    """Randomized SVD draws from torch's RNG: measure on a forked, fixed-seed RNG so the instrument never
    shifts the training's random stream (data order, head growth) and its own numbers are reproducible."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


class SubspaceTracker(SupervisedPlugin, supports_distributed=True):
    """Measures the geometry of the updates after every training experience (formulas: module docstring).

    Add it to any strategy next to :class:`~avl_peft.cl.plugin.PEFTPlugin` (any order)::

        tracker = SubspaceTracker(probe_images, k=8)
        strategy.plugins.append(tracker)   # or plugins=[peft, tracker, ...] at construction
        ...train...
        tracker.records  # one dict per training experience

    :param probe: a fixed batch of inputs (n × C × H × W, n ≥ 2) for feature drift; features are
        ``model.backbone(probe)`` (the model itself when it has no ``backbone``), in eval mode.
    :param k: size of the top-k subspaces (clamped to each matrix's rank).
    :param exact: exact SVD instead of randomized ``torch.svd_lowrank`` (slower on large layers).
    :param writer: where the layer-averaged values go as ``subspace/<metric>`` scalars, step = experience:
        ``"auto"`` (default) uses the writer of a ``TensorboardLogger`` in the strategy's evaluator if
        there is one; ``None`` logs nothing; or any object with ``add_scalar(tag, value, step)``.
    :param targets: module-name suffixes/regexes of the layers to track (pass the ``PEFTPlugin``'s
        targets); default: every linear layer in the blocks. The head is never tracked.
    :param base_session: experience 0 is a full-fine-tuning base session (``PEFTPlugin(pretrain=True)``,
        the B-N protocol): its record is marked ``"base_session": true``.
    :param rebase_after_base_session: after a base session, take the weights and features it produced as
        the reference for every later experience, so the adapter's geometry is measured against the
        backbone it adapts. Experience 0's record is measured against the start.

    The reference W₀ and probe features are taken at the first ``before_training`` the plugin sees —
    before ``PEFTPlugin`` injects anything (injection never changes the base weights anyway). Memory:
    two float32 copies of every tracked weight (W₀ and the previous cumulative update).

    ``records``: one dict per training experience, JSON-ready —
    ``{"experience": t, "overlap": float | None (None at the first experience), "alignment",
    "principal_energy", "effective_rank", "relative_norm", "feature_drift": float,
    "layers": {module name: {the five per-layer values}}}`` plus ``"base_session": True`` on a base
    session's record. ``seconds``: wall time the tracker has spent.
    """

    def __init__(
        self,
        probe: torch.Tensor,
        k: int = 8,
        exact: bool = False,
        *,
        writer: Any = "auto",
        targets: list[str] | tuple[str, ...] | None = None,
        base_session: bool = False,
        rebase_after_base_session: bool = True,
    ):
        super().__init__()
        if not isinstance(probe, torch.Tensor) or probe.dim() < 2 or probe.shape[0] < 2:
            shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
            raise ConfigError(f"probe must be a batch tensor with at least 2 samples, got {shape}")
        try:
            self.k = check_k(k)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if writer not in ("auto", None) and not callable(getattr(writer, "add_scalar", None)):
            raise ConfigError("writer must be 'auto', None or an object with add_scalar(tag, value, step)")
        if targets is not None and (not targets or not all(isinstance(t, str) and t for t in targets)):
            raise ConfigError(f"targets must be a non-empty list of module-name suffixes or regexes, got {targets!r}")
        self.probe = probe.detach().cpu()
        self.exact = bool(exact)
        self.writer = writer
        self.targets = list(targets) if targets is not None else None
        self.base_session = bool(base_session)
        self.rebase_after_base_session = bool(rebase_after_base_session)
        self.records: list[dict[str, Any]] = []
        self.seconds = 0.0  # wall time spent measuring (snapshots included)
        self._layers: dict[str, _Layer] | None = None
        self._features0: torch.Tensor | None = None

        # --- helpers ------------------------------------------------------------------------------------

    def _layer_names(self, strategy: Any) -> list[str]:
        model = strategy.model
        targets = list(DEFAULT_TARGETS if self.targets is None else self.targets)
        heads = head_names(model)
        names = []
        for name, mod in model.named_modules():
            if not name or not isinstance(mod, (nn.Linear, AdaptedLinear)):
                continue
            if any(name == h or name.startswith(h + ".") for h in heads):
                continue
            if name.endswith(".base") and isinstance(model.get_submodule(name[: -len(".base")]), AdaptedLinear):
                continue  # the Linear inside an AdaptedLinear: tracked under the wrapper's name
            if any(matches(name, t) for t in targets):
                names.append(name)
        if not names:
            raise ConfigError(
                f"SubspaceTracker: targets {targets} match no linear layer of {type(model).__name__} outside its head"
            )
        return names

    def _features(self, strategy: Any) -> torch.Tensor:
        model = strategy.model
        net = getattr(model, "backbone", model)
        modes = {m: m.training for m in model.modules()}
        device = getattr(strategy, "device", None) or next(model.parameters()).device
        try:
            model.eval()
            with torch.no_grad():
                out = net(self.probe.to(device))
        finally:
            for m, mode in modes.items():
                m.training = mode
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().float().reshape(out.shape[0], -1)

    def _snapshot(self, strategy: Any) -> None:
        modules = dict(strategy.model.named_modules())
        self._layers = {name: _Layer(_effective_weight(modules[name]).clone()) for name in self._layer_names(strategy)}
        self._features0 = self._features(strategy)

    def _writer(self, strategy: Any) -> Any:
        if self.writer != "auto":
            return self.writer
        for logger in getattr(getattr(strategy, "evaluator", None), "loggers", None) or []:
            if isinstance(logger, TensorboardLogger):
                return logger.writer
        return None

    # --- measurement --------------------------------------------------------------------------------

    def _measure_layer(self, layer: _Layer, weight: torch.Tensor, first: bool) -> dict[str, float | None]:
        k, exact = self.k, self.exact
        if layer.u0 is None:
            layer.u0, _, layer.v0 = top_singular(layer.w0, k, exact=exact)
        cum = weight - layer.w0
        inc = cum if layer.prev is None else cum - layer.prev
        u_cum, s_cum, v_cum = top_singular(cum, k, exact=exact)
        u_inc, _, v_inc = (u_cum, s_cum, v_cum) if inc is cum else top_singular(inc, k, exact=exact)
        overlap = input_overlap = None
        if not first and layer.span is not None and layer.span.shape[1] and u_inc.shape[1]:
            overlap = principal_overlap(u_inc, layer.span)
        # Input side: interference control (orthogonal, project) keeps the increments' row spaces apart.
        if not first and layer.span_in is not None and layer.span_in.shape[1] and v_inc.shape[1]:
            input_overlap = principal_overlap(v_inc, layer.span_in)
        fro2 = float(cum.pow(2).sum())
        out = {
            "overlap": overlap,
            "input_overlap": input_overlap,
            "alignment": principal_overlap(u_cum, layer.u0),
            "principal_energy": principal_energy_in(cum, layer.u0, layer.v0),
            # σ₁ from the same (randomized) SVD: no second decomposition of C_t.
            "effective_rank": stable_rank_from(fro2, float(s_cum[0]) if s_cum.numel() else 0.0),
            "relative_norm": relative_norm(cum, layer.w0),
        }
        if u_inc.shape[1]:
            layer.span = u_inc if layer.span is None else orthonormalize([layer.span, u_inc])
            layer.span_in = v_inc if layer.span_in is None else orthonormalize([layer.span_in, v_inc])
        layer.prev = cum
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue measuring exactly (tensors, numbers, lists, dicts only)."""
        layers = None
        if self._layers is not None:
            layers = {
                name: {slot: getattr(layer, slot) for slot in _Layer.__slots__} for name, layer in self._layers.items()
            }
        return {"records": self.records, "seconds": self.seconds, "features0": self._features0, "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records, self.seconds, self._features0 = state["records"], state["seconds"], state["features0"]
        self._layers = None
        if state["layers"] is not None:
            self._layers = {}
            for name, slots in state["layers"].items():
                layer = _Layer.__new__(_Layer)
                for slot in _Layer.__slots__:
                    setattr(layer, slot, slots.get(slot))
                self._layers[name] = layer

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        with _own_rng():
            self._before_training(strategy)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        with _own_rng():
            self._after_training_exp(strategy)

    def _before_training(self, strategy: Any) -> None:
        if self._layers is None:
            start = time.perf_counter()
            self._snapshot(strategy)
            self.seconds += time.perf_counter() - start

    def _after_training_exp(self, strategy: Any) -> None:
        start = time.perf_counter()
        if self._layers is None:  # trained without before_training (custom loop): measure from here on
            self._snapshot(strategy)
        t = len(self.records)
        modules = dict(strategy.model.named_modules())
        first = all(layer.prev is None for layer in self._layers.values())
        per_layer: dict[str, dict[str, float | None]] = {}
        with torch.no_grad():
            for name, layer in self._layers.items():
                if name not in modules:
                    continue  # the model lost this layer (replaced by hand): nothing to measure
                per_layer[name] = self._measure_layer(layer, _effective_weight(modules[name]), first)
            features = self._features(strategy)
        record: dict[str, Any] = {"experience": t}
        for metric in LAYER_METRICS:
            mean = _mean([v[metric] for v in per_layer.values()])
            record[metric] = mean if mean is not None or metric in OPTIONAL else 0.0
        record["feature_drift"] = feature_drift(self._features0, features)
        base_session = self.base_session and t == 0
        if base_session:
            record["base_session"] = True
        record["layers"] = per_layer
        self.records.append(record)

        writer = self._writer(strategy)
        if writer is not None:
            for metric in METRICS:
                if record[metric] is not None:
                    writer.add_scalar(f"subspace/{metric}", record[metric], t)
        if base_session and self.rebase_after_base_session:
            self._snapshot(strategy)  # the adapters now adapt the base-session backbone
        self.seconds += time.perf_counter() - start
