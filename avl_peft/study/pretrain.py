"""Upstream pretraining of a small timm ViT on the offline ``glyphs`` dataset, cached by config hash.

Without network there are no pretrained weights, yet continual learning with PEFT adapters presumes a
backbone that already knows something. This module trains one on 52-class letter recognition
(:mod:`avl_peft.cl.glyphs`, letters from matplotlib's fonts) within a few CPU minutes and writes:

* ``model.safetensors``: the timm state dict, 52-class head included, loadable with
  ``avl_peft.create_backbone(name, checkpoint=..., num_classes=52, **kwargs)``;
* ``card.json``: what the weights are (timm name and kwargs, class order, input normalisation),
  how good (accuracy on held-out fonts), how made (config and its hash, seed, fonts, versions, wall
  time) and the sha256 of ``model.safetensors``.

Both are written atomically, weights first and card last, so a card whose config hash and sha256
match is proof of a complete output; anything else (no card, unreadable card, truncated weights) is
treated as an interrupted build and rebuilt. :func:`find_or_build` keys a cache folder by config
name and hash, so a second run reuses the weights instead of training again.

Training recipe (tuned for about three minutes on two CPU cores): AdamW with linear warm-up and
cosine decay, label smoothing, jittered samples rendered as each batch is needed (the dataset is
effectively unlimited), position embeddings initialised at the scale of the patch embeddings (see
``_train``: the largest single gain), bf16 autocast (CPUs with AMX run it about twice as fast) and
timm's patch dropout, which drops a fraction of the patch tokens during training only: the model and
its state dict are the same, and evaluation sees every token. Same config and seed give
bit-identical weights on the same machine and thread count.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..atomic import write_bytes, write_json
from ..cl.glyphs import CLASSES, GlyphDataset
from ..errors import ConfigError, DataError
from ..registry import suggest

CARD = "card.json"
WEIGHTS = "model.safetensors"
CARD_FORMAT = "avl-peft-pretrain/1"
# Part of the config hash: bump when the recipe or the glyph renderer changes what a config produces,
# so caches built by older code are not mistaken for current ones.
RECIPE_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# Config schema and validation
# ---------------------------------------------------------------------------------------------------
class _Field:
    """One config value: allowed type(s), default, and an optional range/choice check."""

    def __init__(self, kind: str, default: Any, check: Callable[[Any], str | None] | None = None, doc: str = ""):
        self.kind, self.default, self.check, self.doc = kind, default, check, doc


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


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
    "seed": _Field("int", 0, lambda v: None if v >= 0 else "must be >= 0", "model init, data and font split"),
    "backbone": {
        "name": _Field("str", "vit_tiny_patch16_224", None, "timm model name"),
        "kwargs": _Field("dict", {"img_size": 32, "patch_size": 4, "depth": 4}, None, "timm.create_model options"),
    },
    "data": {
        "dataset": _Field("str", "glyphs", _one_of("glyphs"), "upstream dataset"),
        "train_per_class": _Field("int", 800, _positive, "training images per letter and epoch"),
        "test_per_class": _Field("int", 40, _positive, "held-out-font test images per letter"),
        "img_size": _Field("int", 32, _between(8, 512), "image side in pixels; must match the backbone"),
        "test_fraction": _Field("float", 0.25, _between(0, 1, True, True), "share of fonts held out"),
        "jitter": _Field("float", 0.7, _between(0, 2), "augmentation strength (0: clean glyphs)"),
    },
    "training": {
        "epochs": _Field("int", 1, _positive, "passes over the training images"),
        "batch_size": _Field("int", 64, _positive, "images per step"),
        "lr": _Field("float", 1e-3, _positive, "peak AdamW learning rate"),
        "weight_decay": _Field("float", 0.05, _between(0, 1), "AdamW decay (not on biases, norms, tokens)"),
        "warmup": _Field("float", 0.1, _between(0, 1, False, True), "share of steps with linear warm-up"),
        "label_smoothing": _Field("float", 0.1, _between(0, 1, False, True), "cross-entropy smoothing"),
        "pos_embed_std": _Field(
            "float", 0.5, _between(0, 10), "std of the position embedding init (0: keep timm's 0.02)"
        ),
        "patch_drop": _Field("float", 0.5, _between(0, 1, False, True), "share of patch tokens dropped in training"),
        "precision": _Field("str", "bf16", _one_of("bf16", "fp32"), "autocast dtype of the training steps"),
        "threads": _Field("int", 1, _positive, "torch CPU threads while training"),
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
        word = {"str": "a string", "int": "an integer", "float": "a number", "dict": "a mapping"}[kind]
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
        where = f"pretrain config '{path}'"
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{where} does not exist; give the path of a YAML file") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{where} could not be read as YAML ({type(e).__name__}: {e})") from None
        raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys (name, seed, backbone, data, training)")
    cfg = _default_config()
    _merge(SCHEMA, raw, cfg, "")
    kwargs = cfg["backbone"]["kwargs"]
    if not all(isinstance(k, str) for k in kwargs):
        raise ConfigError("backbone.kwargs keys must be strings (timm.create_model option names)")
    for reserved in ("num_classes", "pretrained", "checkpoint", "patch_drop_rate"):
        if reserved in kwargs:
            raise ConfigError(
                f"backbone.kwargs.{reserved} is set by pretraining itself (52 classes, no download, "
                "training.patch_drop); remove it"
            )
    size = kwargs.get("img_size", cfg["data"]["img_size"])
    if size != cfg["data"]["img_size"]:
        raise ConfigError(
            f"backbone.kwargs.img_size ({size!r}) and data.img_size ({cfg['data']['img_size']}) differ; set them equal"
        )
    return cfg


def config_hash(cfg: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the validated config (canonical JSON) and the recipe version.

    Every key counts, ``training.threads`` included: a thread count may change float rounding.
    """
    cfg = load_pretrain_config(cfg)
    blob = json.dumps({"recipe": RECIPE_VERSION, "config": cfg}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Model, data and the training loop
# ---------------------------------------------------------------------------------------------------
def _create_model(cfg: Mapping[str, Any], checkpoint: Path | None = None, patch_drop: float = 0.0) -> nn.Module:
    import avl_peft

    bb = cfg["backbone"]
    kwargs = dict(bb["kwargs"])
    if patch_drop:
        kwargs["patch_drop_rate"] = patch_drop  # a training-time option: no parameters, same state dict
    return avl_peft.create_backbone(bb["name"], checkpoint=checkpoint, num_classes=len(CLASSES), **kwargs)


def data_config(model: nn.Module, img_size: int) -> dict[str, Any]:
    """The input format the weights expect: timm's mean/std for the model, grey replicated to RGB."""
    resolved = timm.data.resolve_data_config({}, model=model)
    return {
        "img_size": img_size,
        "in_chans": 3,
        "grey_to_rgb": True,
        "mean": [float(m) for m in resolved["mean"]],
        "std": [float(s) for s in resolved["std"]],
    }


def to_model_input(images: torch.Tensor, data_cfg: Mapping[str, Any]) -> torch.Tensor:
    """Grey glyph images ``(N, 1, H, W)`` in [0, 1] -> normalised ``(N, 3, H, W)`` backbone input."""
    mean = torch.tensor(data_cfg["mean"], dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg["std"], dtype=images.dtype).view(1, -1, 1, 1)
    return (images.expand(-1, len(data_cfg["mean"]), -1, -1) - mean) / std


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, data_cfg: Mapping[str, Any]) -> float:
    """Top-1 accuracy in eval mode and float32 (deterministic: the number a reload reproduces)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), 256):
        logits = model(to_model_input(images[start : start + 256], data_cfg))
        correct += int((logits.argmax(1) == labels[start : start + 256]).sum())
    model.train(was_training)
    return correct / max(1, len(labels))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases, norm scales and the learned tokens/position embeddings: decaying them only
    # pulls them towards zero with no regularising benefit (standard ViT practice).
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _lr_factor(step: int, total: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(cfg: Mapping[str, Any], progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Train on glyphs; returns the model (eval mode) and the card's training facts."""
    from tqdm.auto import tqdm

    seed, data, tr = cfg["seed"], cfg["data"], cfg["training"]
    torch.manual_seed(seed)
    model = _create_model(cfg, patch_drop=tr["patch_drop"])
    pos_embed = getattr(model, "pos_embed", None)
    if tr["pos_embed_std"] > 0 and isinstance(pos_embed, nn.Parameter):
        # timm starts position embeddings at std 0.02, some 30x below the patch embeddings; from scratch
        # a ViT then spends hundreds of steps at chance growing them before it can tell where a stroke
        # is. Starting them at the patch embeddings' scale skips that plateau.
        with torch.no_grad():
            pos_embed.normal_(0.0, tr["pos_embed_std"])
    dcfg = data_config(model, data["img_size"])
    common = {"seed": seed, "img_size": data["img_size"], "test_fraction": data["test_fraction"]}
    train_set = GlyphDataset("train", data["train_per_class"], jitter=data["jitter"], **common)
    test_set = GlyphDataset("test", data["test_per_class"], jitter=data["jitter"], **common)

    steps_per_epoch = len(train_set) // tr["batch_size"]
    if steps_per_epoch < 1:
        raise ConfigError(
            f"training.batch_size ({tr['batch_size']}) exceeds the {len(train_set)} training images "
            "(52 x data.train_per_class); lower it or raise data.train_per_class"
        )
    total = steps_per_epoch * tr["epochs"]
    warmup_steps = max(1, round(tr["warmup"] * total))
    opt = torch.optim.AdamW(_param_groups(model, tr["weight_decay"]), lr=tr["lr"], betas=(0.9, 0.99))
    order_rng = torch.Generator().manual_seed(seed)
    use_bf16 = tr["precision"] == "bf16"
    model.train()
    bar = tqdm(total=total, desc=f"pretrain {cfg['name']}", unit="step", disable=not progress, dynamic_ncols=True)
    correct = seen = 0
    loss_value = float("nan")
    step = 0
    for _epoch in range(tr["epochs"]):
        order = torch.randperm(len(train_set), generator=order_rng).numpy()
        for b in range(steps_per_epoch):
            # Render each batch when needed: cheap next to a training step and no epoch held in memory.
            images, labels = train_set.render(order[b * tr["batch_size"] : (b + 1) * tr["batch_size"]])
            for group in opt.param_groups:
                group["lr"] = tr["lr"] * _lr_factor(step, total, warmup_steps)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(to_model_input(images, dcfg))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=tr["label_smoothing"])
            if not torch.isfinite(loss):
                raise DataError(
                    f"pretraining diverged at step {step} (loss {loss.item()}); lower training.lr or raise warmup"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step > total - steps_per_epoch:  # running accuracy over the last epoch, for the card
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
            loss_value = loss.item()
            bar.update(1)
            if step % 10 == 0 or step == total:
                bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    model.eval()
    test_images, test_labels = test_set.as_tensors()
    facts = {
        "test_accuracy": accuracy(model, test_images, test_labels, dcfg),
        "train_accuracy_last_epoch": correct / max(1, seen),
        "final_loss": loss_value,
        "steps": total,
        "samples_seen": total * tr["batch_size"],
        "test_images": len(test_labels),
        "train_fonts": [f.name for f in train_set.fonts],
        "test_fonts": [f.name for f in test_set.fonts],
        "data_config": dcfg,
    }
    return model, facts


# ---------------------------------------------------------------------------------------------------
# Outputs: write, verify, cache
# ---------------------------------------------------------------------------------------------------
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
