"""The frozen backbone: a timm model by its full tag, optionally loaded from a local checkpoint.

timm and torch only (no Avalanche), so `import avl_peft` and the adapters stay free of it; the continual
models that wrap a backbone with an Avalanche head are in :mod:`avl_peft.cl.backbone`.
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from .errors import ConfigError, DataError, key_summary
from .registry import suggest
from .safeio import check_safetensors
from .safeio.safetensors_reader import WEIGHTS_MAX_BYTES
from .validate import is_int, is_number

# Structural timm arguments whose size is surely a typo beyond these (the largest ViTs have depth 48, width
# 1,664, 16 heads, 518-pixel inputs). Checked before the meta-device model is built: timm loops over
# `depth`, so depth: 10**9 would otherwise hang validation.
BACKBONE_KWARG_LIMITS = {
    "depth": 256,
    "img_size": 8192,
    "patch_size": 1024,
    "embed_dim": 65_536,
    "num_heads": 1024,
    "mlp_ratio": 64,
}


def check_backbone_kwargs(kwargs: dict, where: str = "backbone.kwargs") -> None:
    """Names must be strings; the structural sizes in BACKBONE_KWARG_LIMITS positive and below their limit."""
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: argument names must be strings, got {key!r}")
        limit = BACKBONE_KWARG_LIMITS.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]  # img_size/patch_size may be [h, w]
        if limit is not None and all(is_number(v) for v in values):
            if any(not 0 < v <= limit for v in values):
                label = f"{where} {key}" if where.startswith("--") else f"{where}.{key}"  # --timm depth
                raise ConfigError(f"{label}: must be > 0 and <= {limit:,}, got {value!r}")


def closest_models(name: str) -> str:
    arch = name.split(".")[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    return f" Closest timm names: {', '.join(close)}." if close else " See timm.list_models()."


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"checkpoint '{path}' does not exist; give the path of a local .pth or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            # the header is checked (bounded, offsets tiling the data) before safetensors maps the file
            check_safetensors(path, what="checkpoint", max_bytes=WEIGHTS_MAX_BYTES)
            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code, wrong format: all the user's to fix
        raise DataError(f"checkpoint '{path}' could not be read as a state dict ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model", "state_dict_ema"):  # common training-script wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DataError(f"checkpoint '{path}' does not hold a state dict (a mapping of names to tensors)")
    return sd


# The weights file of an `avl-peft pretrain` output folder (its card.json beside it says what they are).
PRETRAIN_WEIGHTS = "model.safetensors"


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local state dict (a file, or a pretrain output folder) into a timm model, resizing as timm does for
    pretrained weights: position embeddings are resampled (timm's checkpoint_filter_fn) and a head of another
    size is dropped."""
    path = Path(path).expanduser()
    if path.is_dir():  # an `avl-peft pretrain` output folder, as backbone.checkpoint accepts in a study
        if not (path / PRETRAIN_WEIGHTS).is_file():
            raise DataError(
                f"checkpoint folder '{path}' holds no {PRETRAIN_WEIGHTS}; give a .pth or .safetensors file or an "
                "`avl-peft pretrain` output folder"
            )
        path = path / PRETRAIN_WEIGHTS
    sd = read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception as e:
            raise DataError(
                f"checkpoint '{path}' does not fit {type(model).__name__} ({type(e).__name__}: {e}); "
                "is it for another architecture?"
            ) from None
    own = model.state_dict()
    heads = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    heads = [heads] if isinstance(heads, str) else list(heads)
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    for k in mismatched:
        if any(k.startswith(h + ".") for h in heads):
            del sd[k]  # another number of classes: keep the fresh head, like timm's pretrained loading
    bad = [k for k in mismatched if k in sd]
    missing = [k for k in own if k not in sd and not any(k.startswith(h + ".") for h in heads)]
    unexpected = [k for k in sd if k not in own]
    if bad or missing or unexpected:
        detail = key_summary([("shape mismatch", bad), ("missing", missing), ("unexpected", unexpected)])
        raise DataError(
            f"checkpoint '{path}' is for another architecture than {type(model).__name__} ({detail}). "
            "Pick the backbone name the checkpoint was trained with."
        )
    model.load_state_dict(sd, strict=False)
    return model


def check_weights_source(*, pretrained: bool, checkpoint: Any, pretrain: Any = None) -> None:
    """The one rule on where a backbone's weights come from: at most one of timm's download, a local
    checkpoint, or a pretrain config (the study's ``backbone.pretrain``)."""
    given = [name for name, v in (("pretrained", pretrained), ("checkpoint", checkpoint), ("pretrain", pretrain)) if v]
    if len(given) > 1:
        raise ConfigError(
            "backbone: set either pretrained: true (download) or checkpoint: PATH (local file) or pretrain: CONFIG "
            f"(built offline), not several; got {', '.join(given)}"
        )


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model by its full tag (e.g. ``vit_base_patch16_224.augreg_in21k``).

    ``pretrained`` downloads timm's weights (needs network); ``checkpoint`` loads a local state dict (a
    ``.pth``/``.safetensors`` file or an ``avl-peft pretrain`` output folder) instead, so offline use works.
    ``timm_kwargs`` go to ``timm.create_model`` (``img_size``, ``depth``…).
    """
    if not is_int(num_classes) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    check_weights_source(pretrained=pretrained, checkpoint=checkpoint)
    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(f"unknown backbone '{name}'.{closest_models(name)}")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **timm_kwargs)
    except TypeError as e:
        raise ConfigError(f"backbone '{name}' does not accept these options {sorted(timm_kwargs)}: {e}") from None
    except (OSError, RuntimeError) as e:
        if pretrained:
            raise DataError(
                f"could not fetch pretrained weights for '{name}' ({type(e).__name__}: {e}). Without network, "
                "download them elsewhere and pass checkpoint: /path/to/weights.safetensors"
            ) from None
        raise
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


# Arguments create_backbone sets itself: passing them as timm keywords would clash.
_SET_BY_AVL_PEFT = {
    "num_classes": "the number of classes comes from the scenario",
    "pretrained": "use backbone.pretrained",
    "checkpoint_path": "use backbone.checkpoint",
}


def meta_backbone(name: str, *, what: str = "backbone.kwargs", **timm_kwargs: Any) -> nn.Module:
    """The backbone's structure on the meta device: no memory, no weights, no download, milliseconds.

    Used to check ``timm_kwargs`` before anything runs and to count adapter parameters. Every way timm can
    refuse the arguments (an unknown keyword, ``depth=-1``, ``patch_size=0``, heads that do not divide the
    width...) becomes a ConfigError whose message starts with ``what`` and names the argument when it can.
    """
    arch = name.split(".")[0] if isinstance(name, str) else name
    if not isinstance(name, str) or not timm.is_model(arch):
        raise ConfigError(f"unknown timm model {name!r}.{closest_models(str(name))}")
    for key in timm_kwargs:
        if key in _SET_BY_AVL_PEFT:
            raise ConfigError(f"{what}: '{key}' cannot be set here; {_SET_BY_AVL_PEFT[key]}")
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, num_classes=1, **timm_kwargs)
    except TypeError as e:
        allowed = _constructor_arguments(name)
        unknown = [k for k in timm_kwargs if allowed is not None and k not in allowed]
        if unknown:
            raise ConfigError(
                f"{what}: '{unknown[0]}' is not an argument of timm model '{arch}'. Its arguments: "
                f"{', '.join(sorted(allowed))}.{suggest(unknown[0], sorted(allowed))}"
            ) from None
        raise ConfigError(f"{what}: timm cannot build '{arch}' with {_describe(timm_kwargs)} ({e})") from None
    except Exception as e:  # ValueError, RuntimeError, AssertionError, ZeroDivisionError, MemoryError...
        raise ConfigError(
            f"{what}: timm cannot build '{arch}' with {_describe(timm_kwargs)} ({type(e).__name__}: {e}); "
            "fix the values"
        ) from None


def _constructor_arguments(name: str) -> set[str] | None:
    """The keyword arguments the model class behind ``name`` accepts; None if it takes ``**kwargs``."""
    try:
        with torch.device("meta"):
            cls = type(timm.create_model(name, pretrained=False, num_classes=1))
    except Exception:  # the default model cannot be built either: no list to offer
        return None
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    skip = {"self", *_SET_BY_AVL_PEFT}
    return {n for n, p in params.items() if n not in skip and p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _describe(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"


def data_config(model: nn.Module) -> dict[str, Any]:
    """Input size and normalisation from the backbone's timm data config (img_size honoured)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        cfg["input_size"] = (3, *tuple(size))
    return {"img_size": int(cfg["input_size"][-1]), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
