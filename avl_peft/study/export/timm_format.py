"""Plain timm format: the merged model as one safetensors file that timm loads as pretrained weights.

``model.safetensors`` holds the state dict of ``timm.create_model(name, num_classes=N, **kwargs)`` with
every adapter folded into its weight (:func:`avl_peft.merge`) and the run's class head as ``head``; timm
loads it with ``timm.create_model(name, pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=...,
num_classes=N), **kwargs)`` (the card's ``load`` says it for the export at hand). :func:`load_timm` does
that after checking the file against the sha256 in the card.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from ...adapters.inject import merge
from ...errors import DataError
from ...safeio import check_safetensors, write_bytes_nofollow
from .card import pick_experience, read_card
from .runs import file_sha256

WEIGHTS = "model.safetensors"


def merged_state(model: nn.Module, head: dict[str, torch.Tensor], classifier: str) -> dict[str, torch.Tensor]:
    """The timm state dict of ``model`` (a ContinualViT) with its adapters merged and ``head`` as classifier."""
    merge(model)  # folds every branch (stacked ones included) into W; the model is the run's function still
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    state.update({f"{classifier}.{k}": v for k, v in head.items()})
    return state


def write_weights(out: Path, sub: str, state: dict[str, torch.Tensor], base: dict[str, Any]) -> dict[str, Any]:
    path = (out / sub if sub else out) / WEIGHTS
    data = save_safetensors(state, metadata={"format": "pt"})
    write_bytes_nofollow(path, data, root=out)
    rel = f"{sub}/{WEIGHTS}" if sub else WEIGHTS
    kwargs = ", ".join(f"{k}={v!r}" for k, v in base["kwargs"].items())
    n = base["num_classes"]
    return {
        "file": rel,
        "sha256": hashlib.sha256(data).hexdigest(),  # of the bytes written: no second read of the file
        "load": (
            f"timm.create_model({base['timm_name']!r}, pretrained=True, num_classes={n}, "
            f"pretrained_cfg_overlay=dict(file='{rel}', num_classes={n}){', ' + kwargs if kwargs else ''})"
        ),
    }


def load_timm(folder: str | Path, *, experience: int | str | None = None) -> nn.Module:
    """The merged model of ``experience`` (default: the last exported) as a plain timm model, in eval mode.

    The weights file is checked against the card's sha256 (DataError naming it if it was modified) and its
    header before timm reads it.
    """
    folder = Path(folder)
    content = read_card(folder, "timm")
    _, entry = pick_experience(content, experience, folder)
    path = folder / entry["file"]
    check_safetensors(path, what="timm weights", max_bytes=64 << 30)
    if file_sha256(path) != entry["sha256"]:
        raise DataError(f"timm weights '{path}' do not match the sha256 in the card (modified or another file)")
    base = content["base"]
    n = int(base["num_classes"])
    model = timm.create_model(
        base["timm_name"],
        pretrained=True,
        num_classes=n,
        pretrained_cfg_overlay={"file": str(path), "num_classes": n},
        **base["kwargs"],
    )
    return model.eval()
