"""Checks of a run's backbone before anything trains: timm arguments on the meta device, the weights source
(checkpoint file or pretrain folder, backbone.pretrain config), and that a parameter budget fits it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm

from ...adapters import METHODS
from ...adapters.budget import select_for_budget
from ...backbones import check_backbone_kwargs, closest_models, meta_backbone
from ...errors import ConfigError, DataError
from ...pretrain import WEIGHTS, load_pretrain_config, read_card
from ...safeio.safetensors_reader import WEIGHTS_MAX_BYTES, safetensors_shapes


def _check_backbone(bb: dict) -> None:
    arch = bb["name"].split(".")[0]
    if not timm.is_model(arch):
        raise ConfigError(f"backbone.name: unknown timm model '{bb['name']}'.{closest_models(bb['name'])}")
    if bb["pretrain"] is not None:
        _check_pretrain(bb)
    if bb["checkpoint"] is not None:
        path = Path(bb["checkpoint"]).expanduser()
        if path.is_dir():
            _check_pretrain_folder(bb, path)
        elif path.suffix == ".safetensors" and path.exists():
            _header_shapes(path)  # a truncated or foreign file fails here, before any run starts
        if not path.exists():
            raise ConfigError(
                f"backbone.checkpoint: '{bb['checkpoint']}' does not exist; give the path of a local .pth or "
                ".safetensors state dict, or an `avl-peft pretrain` output folder"
            )
    check_backbone_kwargs(bb["kwargs"])
    meta_model(bb)  # builds the structure on the meta device: every argument timm refuses fails here


def _check_pretrain_folder(bb: dict, path: Path) -> None:
    """backbone.checkpoint as a folder: a complete pretrain output (weights match the card) of this backbone."""
    try:
        card = read_card(path)
    except ConfigError as e:
        raise ConfigError(f"backbone.checkpoint: {e}") from None
    _same_backbone(bb, (card["backbone"]["name"], dict(card["backbone"]["kwargs"])), f"folder '{path}' holds")
    # The card matches the weights' hash, but a card can be written by anyone: the tensors must be this backbone's.
    check_backbone_kwargs(bb["kwargs"])
    shapes = _header_shapes(path / WEIGHTS)
    for name, tensor in meta_model(bb).state_dict().items():
        if name.startswith("head."):
            continue  # the pretraining head (52 classes) is replaced by the run's own
        if shapes.get(name) != tuple(tensor.shape):
            raise ConfigError(
                f"backbone.checkpoint: '{path / WEIGHTS}' does not hold this backbone's tensor '{name}' "
                f"{tuple(tensor.shape)} (it has {shapes.get(name, 'none')}); rebuild the folder with "
                f"`avl-peft pretrain CONFIG --out {path} --force`"
            )


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        return safetensors_shapes(path, what="weights file", max_bytes=WEIGHTS_MAX_BYTES)
    except DataError as e:
        raise ConfigError(f"backbone.checkpoint: {e}; replace it or rebuild its folder") from None


def _same_backbone(bb: dict, theirs: tuple[str, dict], what: str) -> None:
    ours = (bb["name"], dict(bb["kwargs"]))
    if ours != theirs:
        raise ConfigError(
            f"backbone: {what} {theirs[0]} with {theirs[1]}, but this run's backbone is {ours[0]} with {ours[1]}; "
            "make backbone.name and backbone.kwargs match"
        )


def _check_pretrain(bb: dict) -> None:
    """backbone.pretrain: a valid pretrain config describing this very backbone, and no other weights."""
    if bb["pretrained"] or bb["checkpoint"] is not None:
        raise ConfigError("backbone: set one of pretrained, checkpoint or pretrain, not several")
    path = Path(bb["pretrain"]).expanduser()
    if not path.exists():
        raise ConfigError(
            f"backbone.pretrain: '{path}' does not exist; give a pretrain YAML such as configs/pretrain_glyphs.yaml"
        )
    try:
        pre = load_pretrain_config(path)
    except ConfigError as e:
        raise ConfigError(f"backbone.pretrain: {e}") from None
    _same_backbone(bb, (pre["backbone"]["name"], dict(pre["backbone"]["kwargs"])), f"pretrain config '{path}' trains")


_META_MODELS: dict[str, Any] = {}


def meta_model(bb: dict) -> Any:
    """The backbone on the meta device (cached per name and kwargs); ConfigError if timm refuses them."""
    key = repr((bb["name"], sorted(bb["kwargs"].items())))
    if key not in _META_MODELS:
        _META_MODELS[key] = meta_backbone(bb["name"], what="backbone.kwargs", **bb["kwargs"])
    return _META_MODELS[key]


def _check_budget(cfg: dict) -> None:
    """The budget must fit the method on this backbone (checked on a meta-device model: no memory, fast)."""
    method = cfg["method"]
    if not METHODS.get(method["name"]).budget_knobs:
        return
    try:
        select_for_budget(
            method["name"],
            cfg["budget"],
            backbone_model=meta_model(cfg["backbone"]),
            targets=method["targets"],
            **method["options"],
        )
    except ConfigError as e:
        raise ConfigError(f"budget: {e}") from None
