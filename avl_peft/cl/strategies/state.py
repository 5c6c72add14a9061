"""A strategy's own state as plain data (``torch.load(..., weights_only=True)`` reads it back), and back.

What an Avalanche strategy learns across experiences lives in its plugins or on itself: replay buffers
(datasets), EWC/SI/MAS/RWalk importances (``ParamData`` dicts), LwF's previous model, GEM's memories,
GDumb's initial model… Each :class:`~.base.StrategySpec` names where (:class:`StatePart`: an owner found
on the strategy and the attributes to keep); :func:`encode`/:func:`decode` turn those values into nested
lists, dicts, numbers, strings and tensors and back:

- tensors and ``ParamData`` keep their values and device;
- a dataset (a buffer) is kept as the ids of its samples: every training experience's dataset gets a
  data attribute :data:`UID` (``experience · 2³² + position``, :func:`tag_experience`) that Avalanche
  carries through ``subset``/``concat``, so a buffer is rebuilt from the same experiences' datasets in the
  same order, with the same transform group; other data attributes (DER's stored logits) are kept as
  values;
- a model (a previous-model copy) is kept as its injection descriptor, backbone lineage and full state
  dict, and rebuilt on a fresh model of the run (:class:`StateContext`);
- other objects are allowed only from Avalanche's training package (storage policies, regularisation
  helpers) and are rebuilt from their attributes; anything else raises :class:`StateError`, so a spec
  that claims exact resume but keeps something unsaveable fails loudly in the tests.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from avalanche.benchmarks.utils import AvalancheDataset, concat_datasets
from avalanche.benchmarks.utils.data_attribute import DataAttribute
from avalanche.training.utils import ParamData
from torch import nn

from ...errors import AvlPeftError

UID = "avl_peft_uid"
STRIDE = 2**32
_STANDARD_ATTRIBUTES = {"targets", "targets_task_labels", UID}
_OBJECT_MODULES = ("avalanche.training.", "avl_peft.")
_FACTORIES: dict[str, Callable[[], Any]] = {"dict": dict, "list": list, "set": set, "int": int, "float": float}
K = "__kind__"


class StateError(AvlPeftError):
    """A strategy's state holds something that cannot be saved as plain data, or cannot be rebuilt."""


def tag_experience(experience: Any, index: int) -> Any:
    """Give every sample of a training experience its id :data:`UID` (idempotent); returns the experience."""
    dataset = experience.dataset
    if UID not in dataset._data_attributes:
        experience.dataset = dataset.update_data_attribute(UID, [index * STRIDE + i for i in range(len(dataset))])
    return experience


@dataclasses.dataclass
class StateContext:
    """What rebuilding needs beyond the saved data.

    :param dataset: experience index -> that training experience's dataset (tagged or not).
    :param rebuild_model: (descriptor, lineage, state) -> a model of the run with that structure and state.
    :param device: where tensors saved from an accelerator go (CPU when none is available).
    """

    dataset: Callable[[int], AvalancheDataset]
    rebuild_model: Callable[[dict | None, int, dict[str, torch.Tensor]], nn.Module]
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    def samples(self, uids: torch.Tensor) -> AvalancheDataset:
        """A dataset of the samples with these ids, in this order."""
        experiences = sorted({int(u) // STRIDE for u in uids.tolist()})
        offsets, parts, total = {}, [], 0
        for e in experiences:
            data = self.dataset(e)
            offsets[e], total = total, total + len(data)
            parts.append(data)
        pool = concat_datasets(parts) if len(parts) > 1 else parts[0]
        return pool.subset([offsets[int(u) // STRIDE] + int(u) % STRIDE for u in uids.tolist()])


@dataclasses.dataclass(frozen=True)
class StatePart:
    """Attributes ``attrs`` of the object ``owner(strategy)`` returns; ``rebuild(owner)`` runs after loading
    (to recreate what follows from them, e.g. a data loader over a restored buffer)."""

    owner: Callable[[Any], Any]
    attrs: tuple[str, ...]
    rebuild: Callable[[Any], None] | None = None


def plugin(cls: type) -> Callable[[Any], Any]:
    """``owner`` for a StatePart: the strategy's (one) plugin of class ``cls``."""

    def find(strategy: Any) -> Any:
        found = [p for p in strategy.plugins if isinstance(p, cls)]
        if len(found) != 1:
            raise StateError(f"expected one {cls.__name__} in the strategy's plugins, found {len(found)}")
        return found[0]

    find.__name__ = f"plugin({cls.__name__})"
    return find


def itself(strategy: Any) -> Any:
    """``owner`` for a StatePart: the strategy object."""
    return strategy


def capture(parts: Sequence[StatePart], strategy: Any) -> list[dict[str, Any]]:
    """The encoded attributes of every part, in order."""
    return [{name: encode(getattr(part.owner(strategy), name)) for name in part.attrs} for part in parts]


def restore(parts: Sequence[StatePart], strategy: Any, saved: list[dict[str, Any]], ctx: StateContext) -> None:
    """Put saved attributes back onto a freshly built strategy's objects (then run each part's rebuild)."""
    if len(saved) != len(parts):
        raise StateError(f"saved strategy state has {len(saved)} part(s), this strategy keeps {len(parts)}")
    for part, values in zip(parts, saved):
        owner = part.owner(strategy)
        for name in part.attrs:
            setattr(owner, name, decode(values[name], ctx))
        if part.rebuild is not None:
            part.rebuild(owner)


# -- encoding ------------------------------------------------------------------------------------------


def encode(value: Any) -> Any:
    """``value`` as nested plain data and CPU tensors (see the module docstring)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return {K: "tensor", "data": value.detach().cpu().clone(), "device": str(value.device)}
    if isinstance(value, np.ndarray):
        return {K: "ndarray", "data": torch.from_numpy(np.array(value))}
    if isinstance(value, ParamData):
        if value.init_function is not torch.zeros:
            raise StateError(f"ParamData '{value.name}' has a custom init function; it cannot be saved")
        return {K: "param", "name": value.name, "shape": list(value.shape), "device": str(value.device),
                "data": value.data.detach().cpu().clone()}  # fmt: skip
    if isinstance(value, collections.defaultdict):
        factory = next((k for k, f in _FACTORIES.items() if f is value.default_factory), None)
        if factory is None:
            raise StateError(f"a defaultdict with factory {value.default_factory!r} cannot be saved")
        return {K: "defaultdict", "factory": factory, "items": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, dict):
        return {K: "dict", "items": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return {K: "list", "items": [encode(v) for v in value]}
    if isinstance(value, tuple):
        return {K: "tuple", "items": [encode(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {K: "set", "items": [encode(v) for v in value]}  # iteration order kept
    if isinstance(value, AvalancheDataset):
        return _encode_dataset(value)
    if isinstance(value, nn.Module):
        return _encode_model(value)
    cls = type(value)
    if cls.__module__.startswith(_OBJECT_MODULES) and hasattr(value, "__dict__"):
        return {K: "object", "class": f"{cls.__module__}:{cls.__qualname__}", "attrs": encode(dict(vars(value)))}
    raise StateError(f"cannot save a {cls.__module__}.{cls.__qualname__} as plain data")


def _encode_dataset(dataset: AvalancheDataset) -> dict[str, Any]:
    attributes = dataset._data_attributes
    if len(dataset) == 0:  # e.g. a buffer's initial concat_datasets([])
        return {K: "dataset", "uids": torch.zeros(0, dtype=torch.int64), "group": None, "extras": []}
    if UID not in attributes:
        raise StateError(
            "a buffer dataset has no sample ids: its experiences were not tagged with tag_experience() before training"
        )
    extras = []
    for name, attribute in attributes.items():
        if name in _STANDARD_ATTRIBUTES:
            continue
        values = [attribute[i] for i in range(len(attribute))]
        if values and all(isinstance(v, torch.Tensor) for v in values):
            values = torch.stack([v.detach().cpu() for v in values])
        extras.append([name, encode(values), bool(attribute.use_in_getitem)])
    flat = getattr(dataset, "_flat_data", None)
    groups = getattr(flat, "_transform_groups", None)
    return {
        K: "dataset",
        "uids": torch.as_tensor(list(attributes[UID]), dtype=torch.int64),
        "group": getattr(groups, "current_group", None),
        "extras": extras,
    }


def _encode_model(model: nn.Module) -> dict[str, Any]:
    from ...adapters.inject import injection, lineage

    return {
        K: "model",
        "injected": injection(model),
        "lineage": lineage(model),
        "owner": getattr(model, "avl_peft_owner", None),
        "training": model.training,
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def set_trainable(model: nn.Module, names: Sequence[str]) -> None:
    """``requires_grad`` exactly on ``names`` (strategies freeze parts of models: LFL its last layer)."""
    keep = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)


# -- decoding ------------------------------------------------------------------------------------------


def _device(name: str, ctx: StateContext) -> torch.device:
    device = torch.device(name)
    return device if device.type == "cpu" else ctx.device


def decode(value: Any, ctx: StateContext) -> Any:
    """The inverse of :func:`encode` (datasets and models are rebuilt through ``ctx``)."""
    if not isinstance(value, dict):
        return value
    kind = value.get(K)
    if kind == "tensor":
        return value["data"].to(_device(value["device"], ctx))
    if kind == "ndarray":
        return value["data"].numpy()
    if kind == "param":
        device = _device(value["device"], ctx)
        return ParamData(value["name"], tuple(value["shape"]), init_tensor=value["data"].to(device), device=device)
    if kind == "defaultdict":
        out = collections.defaultdict(_FACTORIES[value["factory"]])
        out.update((decode(k, ctx), decode(v, ctx)) for k, v in value["items"])
        return out
    if kind == "dict":
        return {decode(k, ctx): decode(v, ctx) for k, v in value["items"]}
    if kind in ("list", "tuple", "set"):
        items = [decode(v, ctx) for v in value["items"]]
        return {"list": list, "tuple": tuple, "set": set}[kind](items)
    if kind == "dataset":
        return _decode_dataset(value, ctx)
    if kind == "model":
        model = ctx.rebuild_model(value["injected"], value["lineage"], value["state"])
        if value["owner"] is not None:
            model.avl_peft_owner = value["owner"]
        set_trainable(model, value["trainable"])
        return model.train(value["training"])
    if kind == "object":
        module, _, qualname = value["class"].partition(":")
        if not module.startswith(_OBJECT_MODULES):
            raise StateError(f"refusing to rebuild an object of class {value['class']}")
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        obj = cls.__new__(cls)
        obj.__dict__.update(decode(value["attrs"], ctx))
        return obj
    raise StateError(f"unknown saved value kind {kind!r}")


def _decode_dataset(value: dict[str, Any], ctx: StateContext) -> AvalancheDataset:
    from avalanche.benchmarks.utils import make_avalanche_dataset

    uids = value["uids"]
    if len(uids) == 0:
        return concat_datasets([])
    data = ctx.samples(uids)
    group = value["group"]
    if group is not None and data._flat_data._transform_groups.current_group != group:
        data = data.with_transforms(group)
    extras = [DataAttribute(decode(v, ctx), name, use_in_getitem=flag) for name, v, flag in value["extras"]]
    if extras:
        data = make_avalanche_dataset(data, data_attributes=extras)
    return data
