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

from ...atomic import write_bytes, write_json
from ...cl.glyphs import CLASSES
from ...errors import ConfigError, DataError
from ...hardware import hardware_info
from .config import CARD, CARD_FORMAT, WEIGHTS, config_hash, load_pretrain_config, resolved_precision
from .training import _create_model, _threads, _train


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("avl-peft")
    except PackageNotFoundError:
        own = "unknown"
    return {"torch": torch.__version__, "timm": timm.__version__, "avl_peft": own, "numpy": np.__version__}


def _read_card(out_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(card, '') when ``out_dir`` holds a complete output, else (None, why not)."""
    card_path, weights = out_dir / CARD, out_dir / WEIGHTS
    if not card_path.is_file():
        return None, f"no {CARD} (never built, or the build was interrupted)"
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{CARD} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        return None, f"{CARD} is not an avl-peft pretrain card ({CARD_FORMAT})"
    if not weights.is_file():
        return None, f"{WEIGHTS} is missing"
    if _sha256(weights) != card.get("model_sha256"):
        return None, f"{WEIGHTS} does not match the sha256 in {CARD} (truncated or modified)"
    return card, ""


def check_output(out_dir: str | os.PathLike, cfg: Mapping[str, Any] | None = None) -> str:
    """'' when ``out_dir`` holds a complete output (of ``cfg``, if given), else the reason it does not."""
    card, why = _read_card(Path(out_dir))
    if card is None:
        return why
    if cfg is not None and card.get("config_hash") != config_hash(cfg):
        return f"it was built from another config (hash {card.get('config_hash')}, this one {config_hash(cfg)})"
    return ""


def read_card(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The card of a complete pretrain output folder; ConfigError saying why when it is not one."""
    card, why = _read_card(Path(out_dir))
    if card is None:
        raise ConfigError(
            f"'{out_dir}' is not a complete `avl-peft pretrain` output: {why}; rebuild it with "
            f"`avl-peft pretrain CONFIG --out {out_dir} --force`"
        )
    return card


def _ensure_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"pretrain output folder '{out_dir}' is not writable ({e.strerror or e}); choose another folder "
            "(--out) or point AVL_PEFT_CACHE at a writable one"
        ) from None


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Serialise builds of one folder across processes (parallel runs of one study share the cache)."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): builds are still atomic, just not deduplicated
        yield
        return
    with open(out_dir / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    incomplete or foreign one is rebuilt with a note on stderr. Returns ``out_dir``.
    """
    cfg = load_pretrain_config(cfg)
    out = Path(out_dir).expanduser()
    _ensure_writable(out)
    with _build_lock(out):
        why = check_output(out, cfg)
        if not why and not force:
            return out  # built meanwhile by another process, or earlier
        if force:
            _note(f"rebuilding '{out}' (forced)")
        elif (out / CARD).exists() or (out / WEIGHTS).exists():
            _note(f"rebuilding '{out}': {why}")
        (out / CARD).unlink(missing_ok=True)  # from here on the folder must not look complete
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]), _threads(cfg["training"]["threads"]):
            model, facts = _train(cfg, progress)
            hardware = hardware_info("cpu")  # inside: records the threads the build trained with
        from safetensors.torch import save

        blob = save({k: v.contiguous() for k, v in model.state_dict().items()})
        write_bytes(out / WEIGHTS, blob)
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
            "threads": cfg["training"]["threads"],
            "precision": resolved_precision(cfg),
            "hardware": hardware,
            "wall_time_s": round(time.perf_counter() - start, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(out / CARD, card)  # last: its presence marks the output complete
    return out


def default_cache_dir() -> Path:
    """``$AVL_PEFT_CACHE/pretrain`` if that variable is set, else ``~/.cache/avl-peft/pretrain``."""
    root = os.environ.get("AVL_PEFT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "avl-peft") / "pretrain"


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
    """The output folder for ``cfg`` in the cache, trained first unless a complete one is there."""
    return pretrain(cfg, output_dir(cfg, cache_dir), force=force, progress=progress)


def load_pretrained(out_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, card)`` from a pretrain output folder; the model (eval mode) keeps its 52-class head.

    The weights are checked against the card's sha256 first; an incomplete folder raises DataError.
    """
    out = Path(out_dir).expanduser()
    card, why = _read_card(out)
    if card is None:
        raise DataError(f"'{out}' is not a complete pretrain output: {why}. Rebuild it with avl-peft pretrain")
    cfg = {"backbone": card["backbone"]}
    model = _create_model(cfg, checkpoint=out / WEIGHTS)
    return model.eval(), card
