"""Pretrain outputs: model.safetensors + card.json written atomically, checked, cached by config hash."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from ..cl.backbone import create_continual_model
from ..cl.scenarios.glyphs import CLASSES
from ..errors import ConfigError, DataError
from ..hardware import hardware_info
from ..safeio import (
    check_writable,
    file_sha256,
    load_json,
    project_cache_dir,
    write_bytes_nofollow,
    write_text_nofollow,
)
from ..safeio.locks import LOCK_NAME, folder_lock
from ..safeio.safetensors_reader import WEIGHTS_MAX_BYTES, safetensors_shapes
from ..validate import is_int, is_number
from .config import CARD, CARD_FORMAT, WEIGHTS, config_hash, load_pretrain_config, resolved_precision, resolved_threads
from .training import _create_model, _threads, _train


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("avl-peft")
    except PackageNotFoundError:
        own = "unknown"
    return {"torch": torch.__version__, "timm": timm.__version__, "avl_peft": own, "numpy": np.__version__}


# card.json is a few KB; anything far larger or deeper was not written by avl-peft.
CARD_MAX_BYTES = 1 << 20
CARD_MAX_DEPTH = 16
# What the rest of avl-peft reads from a card, and the type each must have.
_CARD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "name": str,
    "backbone": dict,
    "num_classes": is_int,
    "classes": list,
    "data_config": dict,
    "config_hash": str,
    "model_sha256": str,
    "test_accuracy": is_number,
    "wall_time_s": is_number,
}


def _card_problem(card: Any) -> str:
    """'' if ``card`` has every field avl-peft reads, with the right type; else what is wrong."""
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        return f"{CARD} is not an avl-peft pretrain card ({CARD_FORMAT})"
    for key, kind in _CARD_FIELDS.items():
        value = card.get(key)
        if not (isinstance(value, kind) if isinstance(kind, type) else kind(value)):
            what = {is_int: "an integer", is_number: "a number"}.get(kind, f"a {getattr(kind, '__name__', kind)}")
            return f"{CARD} field '{key}' is missing or not {what}"
    bb, dc = card["backbone"], card["data_config"]
    if not isinstance(bb.get("name"), str) or not isinstance(bb.get("kwargs"), dict):
        return f"{CARD} field 'backbone' must hold a name (string) and kwargs (mapping)"
    if card["num_classes"] != len(card["classes"]) or not all(isinstance(c, str) for c in card["classes"]):
        return f"{CARD} fields 'classes' and 'num_classes' disagree"
    stats = [dc.get("mean"), dc.get("std")]
    if not all(isinstance(v, list) and v and all(is_number(x) for x in v) for v in stats):
        return f"{CARD} field 'data_config' must hold mean and std lists of numbers"
    if not is_int(dc.get("img_size")) or not all(x > 0 for x in dc["std"]):
        return f"{CARD} field 'data_config' must hold an integer img_size and positive std values"
    return ""


def _read_card(out_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(card, '') when ``out_dir`` holds a complete output, else (None, why not). Callers hold the lock.

    The card is read bounded (:func:`avl_peft.safeio.load_json`) and schema-checked; the weights' size is
    checked against their safetensors header before they are hashed, so a link to a huge unrelated file is
    refused at once instead of being read in full.
    """
    card_path, weights = out_dir / CARD, out_dir / WEIGHTS
    if not card_path.exists() and not card_path.is_symlink():
        return None, f"no {CARD} (never built, or the build was interrupted)"
    try:
        card = load_json(card_path, what="pretrain card", max_bytes=CARD_MAX_BYTES, max_depth=CARD_MAX_DEPTH)
    except DataError as e:
        return None, f"{CARD} is unreadable ({e})"
    problem = _card_problem(card)
    if problem:
        return None, problem
    if not weights.exists():
        return None, f"{WEIGHTS} is missing"
    try:
        safetensors_shapes(weights, what="pretrain weights", max_bytes=WEIGHTS_MAX_BYTES)
    except DataError as e:
        return None, str(e)
    if file_sha256(weights) != card["model_sha256"]:
        return None, f"{WEIGHTS} does not match the sha256 in {CARD} (truncated or modified)"
    return card, ""


@contextlib.contextmanager
def _reading(out_dir: Path) -> Iterator[None]:
    """Hold the folder's build lock while reading, when the folder has one (built by avl-peft, writable).

    A build writes the weights, then the card, under this lock; reading both under it means a card is never
    paired with weights another process is replacing.
    """
    if (out_dir / LOCK_NAME).exists() and os.access(out_dir, os.W_OK):
        with folder_lock(out_dir, blocking=True, what="pretrain output folder"):
            yield
    else:
        yield


def check_output(out_dir: str | os.PathLike, cfg: Mapping[str, Any] | None = None) -> str:
    """'' when ``out_dir`` holds a complete output (of ``cfg``, if given), else the reason it does not."""
    out = Path(out_dir).expanduser()
    with _reading(out):
        card, why = _read_card(out)
    if card is None:
        return why
    if cfg is not None and card["config_hash"] != config_hash(cfg):
        return f"it was built from another config (hash {card['config_hash']}, this one {config_hash(cfg)})"
    return ""


def read_card(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The card of a complete pretrain output folder; ConfigError saying why when it is not one."""
    out = Path(out_dir).expanduser()
    with _reading(out):
        card, why = _read_card(out)
    if card is None:
        raise ConfigError(
            f"'{out_dir}' is not a complete `avl-peft pretrain` output: {why}; rebuild it with "
            f"`avl-peft pretrain CONFIG --out {out_dir} --force`"
        )
    return card


def _note(message: str) -> None:
    print(f"avl-peft pretrain: {message}", file=sys.stderr, flush=True)


def pretrain(
    cfg: str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train the configured backbone on glyphs and write ``model.safetensors`` + ``card.json`` to ``out_dir``.

    A complete output of the same config already there is kept (no training) unless ``force``; an
    incomplete one is rebuilt with a note on stderr. A complete output of another config is refused
    (ConfigError naming the config that owns the folder) unless ``force``. Everything happens under the
    folder's lock, and the files are written without following links below ``out_dir``. Returns ``out_dir``.
    """
    cfg = load_pretrain_config(cfg)
    out = Path(out_dir).expanduser()
    check_writable(out, fix="choose another folder (--out) or point AVL_PEFT_CACHE at a writable one")
    with folder_lock(out, blocking=True, what="pretrain output folder"):
        card, why = _read_card(out)
        if card is not None and card["config_hash"] != config_hash(cfg) and not force:
            raise ConfigError(
                f"pretrain output folder '{out}' holds the weights of another pretrain config: "
                f"'{card['name']}' (hash {card['config_hash']}); this config is '{cfg['name']}' (hash "
                f"{config_hash(cfg)}). Choose another --out, or pass --force to replace them"
            )
        if card is not None and not force:
            return out  # built meanwhile by another process, or earlier
        if force:
            _note(f"rebuilding '{out}' (forced)")
        elif (out / CARD).exists() or (out / WEIGHTS).exists():
            _note(f"rebuilding '{out}': {why}")
        (out / CARD).unlink(missing_ok=True)  # from here on the folder must not look complete (a link: removed)
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]), _threads(resolved_threads(cfg)):
            model, facts = _train(cfg, progress)
            hardware = hardware_info("cpu")  # inside: records the threads the build trained with
        from safetensors.torch import save

        blob = save({k: v.contiguous() for k, v in model.state_dict().items()})
        write_bytes_nofollow(out / WEIGHTS, blob, root=out)
        card = {
            "format": CARD_FORMAT,
            "name": cfg["name"],
            "backbone": {"name": cfg["backbone"]["name"], "kwargs": cfg["backbone"]["kwargs"]},
            "num_classes": len(CLASSES),
            "classes": list(CLASSES),
            "data_config": facts.pop("data_config"),
            "dataset": cfg["data"]["dataset"],
            "seed": cfg["seed"],
            **facts,
            "config": cfg,
            "config_hash": config_hash(cfg),
            "model_file": WEIGHTS,
            "model_sha256": hashlib.sha256(blob).hexdigest(),
            "versions": _versions(),
            "threads": resolved_threads(cfg),
            "precision": resolved_precision(cfg),
            "hardware": hardware,
            "wall_time_s": round(time.perf_counter() - start, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # last: its presence marks the output complete
        write_text_nofollow(out / CARD, json.dumps(card, indent=2, default=float), root=out)
    return out


def default_cache_dir() -> Path:
    """``$AVL_PEFT_CACHE/pretrain`` if that variable is set, else ``~/.cache/avl-peft/pretrain``."""
    return project_cache_dir("pretrain")


def output_dir(cfg: str | os.PathLike | Mapping[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of a config: ``<cache_dir>/<name>-<config hash>``."""
    cfg = load_pretrain_config(cfg)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{cfg['name']}-{config_hash(cfg)}"


def find_or_build(
    cfg: str | os.PathLike | Mapping[str, Any],
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """The output folder for ``cfg`` in the cache, trained first unless a complete one is there.

    The cache folder is trusted (it may be a link to a scratch disk), its entries are not: an entry that is a
    symbolic link (or a file) raises ConfigError instead of being written through.
    """
    out = output_dir(cfg, cache_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(
            f"pretrain cache entry '{out}' is a symbolic link or not a folder; avl-peft never makes those, so "
            "remove it (it is rebuilt)"
        )
    return pretrain(cfg, out, force=force, progress=progress)


def pretrained_model(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    head: str = "incremental",
    initial_classes: int = 2,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> nn.Module:
    """A continual model on the backbone a pretrain config trains, as ``backbone.pretrain: config`` gives a run.

    The weights come from the cache when a complete output of ``config`` is there, else it is trained first
    (:func:`find_or_build`, what ``avl-peft run`` does); the pretraining head is dropped for ``head``
    (``incremental`` or ``multi``, see :func:`~avl_peft.cl.backbone.create_continual_model`).
    """
    cfg = load_pretrain_config(config)
    folder = find_or_build(cfg, cache_dir, progress=progress)
    bb = cfg["backbone"]
    return create_continual_model(
        bb["name"], head=head, initial_classes=initial_classes, checkpoint=folder / WEIGHTS, **bb["kwargs"]
    )


def load_pretrained(out_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, card)`` from a pretrain output folder; the model (eval mode) keeps its 52-class head.

    The weights are checked against the card's sha256 first; an incomplete folder raises DataError.
    """
    out = Path(out_dir).expanduser()
    with _reading(out):  # the weights loaded are the ones the card was checked against
        card, why = _read_card(out)
        if card is None:
            raise DataError(f"'{out}' is not a complete pretrain output: {why}. Rebuild it with avl-peft pretrain")
        model = _create_model({"backbone": card["backbone"]}, checkpoint=out / WEIGHTS)
    return model.eval(), card
