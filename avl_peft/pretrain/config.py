"""The pretrain config: its schema (validated strictly, with did-you-mean), defaults and hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..backbones import check_backbone_kwargs, meta_backbone
from ..cl.scenarios.glyph_fonts import FONT_POOLS, font_manifest
from ..errors import ConfigError
from ..hardware import bf16_native
from ..options import knob, parse_options
from ..safeio import load_yaml
from ..threads import default_threads
from ..validate import check_finite

CARD = "card.json"
WEIGHTS = "model.safetensors"
CARD_FORMAT = "avl-peft-pretrain/1"
# Part of the config hash: bump when the recipe or the glyph renderer changes what a config produces,
# so caches built by older code are not mistaken for current ones.
RECIPE_VERSION = 2  # 2: held-out font families, fill-layout samples (values in the config are hashed as given)
# More threads than any machine has cores only slows training (1,000 threads: steps 50-90x slower).
MAX_THREADS = 256
# The held-out test set is rendered whole: 52 x test_per_class x img_size^2 float32 values at most this size.
MAX_TEST_SET_BYTES = 2 << 30
PRECISIONS = ("auto", "bf16", "fp32")


# ---------------------------------------------------------------------------------------------------
# Config schema: dataclasses of knobs, parsed by avl_peft.options.parse_options (the run config's engine)
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PretrainBackbone:
    name: str = knob("vit_tiny_patch16_224", "timm model name")
    kwargs: dict = knob({"img_size": 32, "patch_size": 4, "depth": 4}, "timm.create_model options")


@dataclasses.dataclass(frozen=True)
class PretrainData:
    dataset: str = knob("glyphs", "upstream dataset", choices=("glyphs",))
    train_per_class: int = knob(768, "training images per letter and epoch", minimum=1, maximum=100_000)
    test_per_class: int = knob(40, "held-out-family test images per letter", minimum=1, maximum=10_000)
    img_size: int = knob(32, "image side in pixels; must match the backbone", minimum=8, maximum=512)
    test_fraction: float = knob(
        0.25, "share of font families held out", minimum=0, maximum=1, exclusive_min=True, exclusive_max=True
    )
    jitter: float = knob(0.7, "augmentation strength (0: clean glyphs)", minimum=0, maximum=2)
    fill_share: float = knob(
        0.45, "share of training glyphs scaled to fill the canvas (other layout convention)", minimum=0, maximum=1
    )
    fonts: str = knob("matplotlib", "font pool: matplotlib's, or also the system's (fc-list)", choices=FONT_POOLS)


@dataclasses.dataclass(frozen=True)
class PretrainTraining:
    epochs: int = knob(1, "passes over the training images", minimum=1, maximum=10_000)
    batch_size: int = knob(64, "images per step", minimum=1, maximum=65_536)
    lr: float = knob(1e-3, "peak AdamW learning rate", minimum=0, maximum=10, exclusive_min=True)
    weight_decay: float = knob(0.05, "AdamW decay (not on biases, norms, tokens)", minimum=0, maximum=1)
    # shares of a whole: 1 would warm up, smooth or drop everything
    warmup: float = knob(0.1, "share of steps with linear warm-up", minimum=0, maximum=1, exclusive_max=True)
    label_smoothing: float = knob(0.1, "cross-entropy smoothing", minimum=0, maximum=1, exclusive_max=True)
    pos_embed_std: float = knob(0.6, "std of the position embedding init (0: keep timm's 0.02)", minimum=0, maximum=10)
    patch_drop: float = knob(0.25, "share of patch tokens dropped", minimum=0, maximum=1, exclusive_max=True)
    precision: str = knob("auto", "autocast dtype (auto: bf16 where the CPU has it natively)", choices=PRECISIONS)
    threads: int | None = knob(
        None, "torch CPU threads (null: the cores given, or OMP_NUM_THREADS)", minimum=1, maximum=MAX_THREADS
    )


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    name: str = knob("glyphs_vit_tiny", "names the cache folder <name>-<hash>")
    seed: int = knob(0, "model init, data and font split", minimum=0, maximum=2**32 - 1)
    backbone: PretrainBackbone = dataclasses.field(default_factory=PretrainBackbone)
    data: PretrainData = dataclasses.field(default_factory=PretrainData)
    training: PretrainTraining = dataclasses.field(default_factory=PretrainTraining)


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
    if not isinstance(source, Mapping) and {"scenario", "method", "strategy"} & set(raw):
        raise ConfigError(
            f"{where} is a study config (it has scenario/method/strategy); run it with `avl-peft run {path}`"
        )
    try:
        return _validated(raw)
    except ConfigError as e:
        if isinstance(source, Mapping):
            raise
        raise ConfigError(f"{where}: {e}") from None  # the file as well as the key


def _validated(raw: Mapping[str, Any]) -> dict[str, Any]:
    parsed = parse_options(PretrainConfig, "", dict(raw), noun="key")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", parsed.name):  # it names a cache folder
        raise ConfigError(f"name: must be letters, digits, '_', '.', '-' (a folder name), got {parsed.name!r}")
    cfg = dataclasses.asdict(parsed)
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


def resolved_threads(cfg: Mapping[str, Any]) -> int:
    """``training.threads`` as this process trains with it: null is the thread policy's number for a process
    that has the machine's cores to itself (``avl_peft/threads.py``: ``OMP_NUM_THREADS``, else the cores
    this process is given). The pretrain runs alone: before a study's runs, whose workers wait on its lock."""
    threads = cfg["training"]["threads"]
    return default_threads(1) if threads is None else threads


def config_hash(cfg: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the validated config (canonical JSON) and the recipe version.

    Every key counts, ``training.threads`` included, as resolved (:func:`resolved_threads`): a thread count
    may change float rounding. The precision counts as resolved too (:func:`resolved_precision`): bf16 and
    fp32 builds are different weights, so one machine's cache is not taken for the other's, and ``auto``
    shares the cache of what it resolves to. The font list of ``data.fonts`` counts too (file, family,
    style, size): other fonts, other weights.
    """
    cfg = load_pretrain_config(cfg)
    cfg["training"]["precision"] = resolved_precision(cfg)
    cfg["training"]["threads"] = resolved_threads(cfg)
    fonts = font_manifest(cfg["data"]["fonts"])
    blob = json.dumps({"recipe": RECIPE_VERSION, "config": cfg, "fonts": fonts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Model, data and the training loop
# ---------------------------------------------------------------------------------------------------
