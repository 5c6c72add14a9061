"""The pretrain config: its schema (validated strictly, with did-you-mean), defaults and hash."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..backbones import check_backbone_kwargs, meta_backbone
from ..errors import ConfigError
from ..hardware import bf16_native
from ..registry import suggest
from ..safeio import check_finite, load_yaml

CARD = "card.json"
WEIGHTS = "model.safetensors"
CARD_FORMAT = "avl-peft-pretrain/1"
# Part of the config hash: bump when the recipe or the glyph renderer changes what a config produces,
# so caches built by older code are not mistaken for current ones.
RECIPE_VERSION = 1
# More threads than any machine has cores only slows training (1,000 threads: steps 50-90x slower).
MAX_THREADS = 256
# The held-out test set is rendered whole: 52 x test_per_class x img_size^2 float32 values at most this size.
MAX_TEST_SET_BYTES = 2 << 30


# ---------------------------------------------------------------------------------------------------
# Config schema and validation
# ---------------------------------------------------------------------------------------------------
class _Field:
    """One config value: allowed type(s), default, and an optional range/choice check."""

    def __init__(self, kind: str, default: Any, check: Callable[[Any], str | None] | None = None, doc: str = ""):
        self.kind, self.default, self.check, self.doc = kind, default, check, doc


def _between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _name_check(v: str) -> str | None:
    # the name becomes a cache folder name: keep it a plain, portable file name
    return None if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v) else "must be letters, digits, '_', '.', '-'"


SCHEMA: dict[str, Any] = {
    "name": _Field("str", "glyphs_vit_tiny", _name_check, "names the cache folder <name>-<hash>"),
    "seed": _Field("int", 0, _between(0, 2**32 - 1), "model init, data and font split"),
    "backbone": {
        "name": _Field("str", "vit_tiny_patch16_224", None, "timm model name"),
        "kwargs": _Field("dict", {"img_size": 32, "patch_size": 4, "depth": 4}, None, "timm.create_model options"),
    },
    "data": {
        "dataset": _Field("str", "glyphs", _one_of("glyphs"), "upstream dataset"),
        "train_per_class": _Field("int", 320, _between(1, 100_000), "training images per letter and epoch"),
        "test_per_class": _Field("int", 40, _between(1, 10_000), "held-out-font test images per letter"),
        "img_size": _Field("int", 32, _between(8, 512), "image side in pixels; must match the backbone"),
        "test_fraction": _Field("float", 0.25, _between(0, 1, True, True), "share of fonts held out"),
        "jitter": _Field("float", 0.7, _between(0, 2), "augmentation strength (0: clean glyphs)"),
    },
    "training": {
        "epochs": _Field("int", 1, _between(1, 10_000), "passes over the training images"),
        "batch_size": _Field("int", 32, _between(1, 65_536), "images per step"),
        "lr": _Field("float", 7e-4, _between(0, 10, lo_open=True), "peak AdamW learning rate"),
        "weight_decay": _Field("float", 0.05, _between(0, 1), "AdamW decay (not on biases, norms, tokens)"),
        "warmup": _Field("float", 0.1, _between(0, 1, False, True), "share of steps with linear warm-up"),
        "label_smoothing": _Field("float", 0.1, _between(0, 1, False, True), "cross-entropy smoothing"),
        "pos_embed_std": _Field(
            "float", 0.6, _between(0, 10), "std of the position embedding init (0: keep timm's 0.02)"
        ),
        "patch_drop": _Field("float", 0.25, _between(0, 1, False, True), "share of patch tokens dropped in training"),
        "precision": _Field(
            "str", "auto", _one_of("auto", "bf16", "fp32"), "autocast dtype (auto: bf16 where the CPU has it natively)"
        ),
        "threads": _Field("int", 1, _between(1, MAX_THREADS), "torch CPU threads while training"),
    },
}


def _default_config(schema: Mapping[str, Any] = SCHEMA) -> dict[str, Any]:
    return {k: _default_config(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}


def _coerce(value: Any, field: _Field, key: str) -> Any:
    kind = field.kind
    if kind == "float" and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; accept what is plainly a number
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "dict": isinstance(value, dict),
    }[kind]
    if not ok:
        word = {"str": "a string", "int": "an integer", "float": "a finite number", "dict": "a mapping"}[kind]
        raise ConfigError(f"{key} must be {word}, got {value!r} ({type(value).__name__})")
    if kind == "float":
        value = float(value)
    if field.check is not None:
        problem = field.check(value)
        if problem:
            raise ConfigError(f"{key} {problem}, got {value!r}")
    return value


def _merge(schema: Mapping[str, Any], given: Mapping[str, Any], out: dict[str, Any], prefix: str) -> None:
    for key, value in given.items():
        path = f"{prefix}{key}"
        if key not in schema:
            names = list(schema)
            raise ConfigError(
                f"unknown key '{path}' in the pretrain config. Allowed here: {', '.join(names)}.{suggest(key, names)}"
            )
        spec = schema[key]
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a mapping with keys {', '.join(spec)}, got {value!r}")
            _merge(spec, value, out[key], f"{path}.")
        else:
            out[key] = _coerce(value, spec, path)


def load_pretrain_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The validated pretrain config with defaults filled in, from a YAML file or a mapping.

    Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key path
    (``training.lr``) and what is allowed.
    """
    if isinstance(source, Mapping):
        raw: Any = source
        where = "the pretrain config"
    else:
        path = Path(source).expanduser()
        where = f"pretrain config file '{path}'"
        # The study path's reader: bounded size, depth and aliases; duplicate and non-string keys refused.
        raw = load_yaml(path, what="pretrain config")
        raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys (name, seed, backbone, data, training)")
    try:
        return _validated(raw)
    except ConfigError as e:
        if isinstance(source, Mapping):
            raise
        raise ConfigError(f"{where}: {e}") from None  # the file as well as the key


def _validated(raw: Mapping[str, Any]) -> dict[str, Any]:
    cfg = _default_config()
    _merge(SCHEMA, raw, cfg, "")
    _check_backbone(cfg)
    data, training = cfg["data"], cfg["training"]
    test_bytes = 52 * data["test_per_class"] * data["img_size"] ** 2 * 4
    if test_bytes > MAX_TEST_SET_BYTES:
        raise ConfigError(
            f"data.test_per_class ({data['test_per_class']}) at data.img_size {data['img_size']} makes a "
            f"{test_bytes / 2**30:.1f} GiB test set (limit {MAX_TEST_SET_BYTES / 2**30:.0f} GiB); lower one of them"
        )
    if training["batch_size"] > 52 * data["train_per_class"]:
        raise ConfigError(
            f"training.batch_size ({training['batch_size']}) exceeds the {52 * data['train_per_class']} training "
            "images (52 x data.train_per_class); lower it or raise data.train_per_class"
        )
    return cfg


_CHECKED_BACKBONES: set[str] = set()


def _check_backbone(cfg: dict[str, Any]) -> None:
    """backbone.kwargs: finite values, bounded sizes, no options pretraining sets, built on the meta device."""
    name, kwargs = cfg["backbone"]["name"], cfg["backbone"]["kwargs"]
    if not all(isinstance(k, str) for k in kwargs):
        raise ConfigError("backbone.kwargs keys must be strings (timm.create_model option names)")
    for reserved in ("num_classes", "pretrained", "checkpoint", "patch_drop_rate"):
        if reserved in kwargs:
            raise ConfigError(
                f"backbone.kwargs.{reserved} is set by pretraining itself (52 classes, no download, "
                "training.patch_drop); remove it"
            )
    for key, value in kwargs.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            check_finite(item, f"backbone.kwargs.{key}")
    size = kwargs.get("img_size", cfg["data"]["img_size"])
    if size != cfg["data"]["img_size"]:
        raise ConfigError(
            f"backbone.kwargs.img_size ({size!r}) and data.img_size ({cfg['data']['img_size']}) differ; set them equal"
        )
    key = repr((name, sorted(kwargs.items())))
    if key not in _CHECKED_BACKBONES:  # configs are validated often (config_hash); timm is asked once
        check_backbone_kwargs(kwargs)
        try:
            meta_backbone(name, what="backbone.kwargs", **kwargs)  # shapes only: no memory, milliseconds
        except ConfigError as e:
            message = str(e)
            raise ConfigError(message if message.startswith("backbone") else f"backbone.name: {message}") from None
        _CHECKED_BACKBONES.add(key)


def resolved_precision(cfg: Mapping[str, Any]) -> str:
    """``training.precision`` as this machine trains it: ``auto`` is bf16 where the CPU runs it natively
    (AMX, AVX512-BF16; :mod:`avl_peft.hardware`), else fp32."""
    precision = cfg["training"]["precision"]
    if precision != "auto":
        return precision
    return "bf16" if bf16_native(torch.device("cpu")) else "fp32"


def config_hash(cfg: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the validated config (canonical JSON) and the recipe version.

    Every key counts, ``training.threads`` included: a thread count may change float rounding. The
    precision counts as resolved (:func:`resolved_precision`): bf16 and fp32 builds are different weights,
    so one machine's cache is not taken for the other's, and ``auto`` shares the cache of what it resolves to.
    """
    cfg = load_pretrain_config(cfg)
    cfg["training"]["precision"] = resolved_precision(cfg)
    blob = json.dumps({"recipe": RECIPE_VERSION, "config": cfg}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Model, data and the training loop
# ---------------------------------------------------------------------------------------------------
