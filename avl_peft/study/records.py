"""What a run resolves about itself and records in results.json: versions, where its backbone weights came
from, the budget's chosen options, the adapter's scale, and which head produced the accuracy matrix."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import avalanche
import timm
import torch

from ..adapters import METHODS
from ..adapters.base import parse_options
from ..adapters.budget import select_for_budget
from ..instruments.metrics import summarize_both
from ..pretrain import CARD, find_or_build, load_pretrain_config, read_card
from .parts import RunParts


def versions() -> dict[str, str]:
    from .. import __version__

    return {
        "avl_peft": __version__,
        "torch": torch.__version__,
        "avalanche": getattr(avalanche, "__version__", "unknown"),
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def resolve_checkpoint(bb: dict) -> Path | None:
    """The backbone weights file: ``backbone.checkpoint`` (a file, or a pretrain output folder), or the cached
    output of ``backbone.pretrain`` (built first if the cache has no complete one)."""
    if bb.get("pretrain") is not None:
        return find_or_build(load_pretrain_config(bb["pretrain"])) / "model.safetensors"
    if bb["checkpoint"] is None:
        return None
    path = Path(bb["checkpoint"]).expanduser()
    return path / "model.safetensors" if path.is_dir() else path


# What results.json records of a pretrain card (``backbone_weights``): enough to tell two backbones apart.
PROVENANCE_KEYS = ("name", "config_hash", "model_sha256", "test_accuracy", "created")


def weights_provenance(bb: dict, checkpoint: Path | None) -> dict[str, Any]:
    """Which backbone weights a run started from: recorded in results.json (``backbone_weights``)."""
    if checkpoint is None:
        return {"source": "timm_pretrained" if bb["pretrained"] else "random_init", "name": bb["name"]}
    out: dict[str, Any] = {"source": "checkpoint", "file": str(checkpoint)}
    if (checkpoint.parent / CARD).is_file():  # a pretrain output: its card says what the weights are
        card = read_card(checkpoint.parent)
        out.update(source="pretrain", **{k: card.get(k) for k in PROVENANCE_KEYS})
    return out


def resolve_budget(cfg: dict, model: torch.nn.Module) -> dict[str, Any] | None:
    """With ``budget: N``, the method's options chosen so its adapter has at most N parameters."""
    method = cfg["method"]
    if cfg.get("budget") is None or not METHODS.get(method["name"]).budget_knobs:
        return None
    chosen = select_for_budget(
        method["name"], cfg["budget"], backbone_model=model, targets=method["targets"], **method["options"]
    )
    return {
        "budget": cfg["budget"],
        "options": {k: v for k, v in chosen.items() if k != "adapter_params"},
        "adapter_params": chosen["adapter_params"],
    }


def scaling_block(cfg: dict, budget: dict[str, Any] | None) -> dict[str, Any] | None:
    """The adapter's scale as resolved (``alpha_policy``, α, s; see AdapterOptions); None for full/head."""
    name = cfg["method"]["name"]
    cls = METHODS.get(name)
    if not cls.adds_adapter:
        return None
    return parse_options(cls.Options, name, budget["options"] if budget else cfg["method"]["options"]).scaling()


def heads_block(cfg: dict, parts: RunParts) -> dict[str, Any]:
    """Which classifier produced ``accuracy_matrix`` and, for a statistics head, the linear head's numbers."""
    name = cfg["training"]["head"]
    block: dict[str, Any] = {"class_incremental": name}
    classifier = parts.stateful.get("classifier")
    if classifier is not None and classifier.moments is not None:
        block["moments"] = {"classes": len(classifier.moments.seen_classes), "bytes": classifier.moments.nbytes()}
    if "linear_matrix" in parts.stateful:
        block["summary"] = classifier.head.summary()
        linear = parts.stateful["linear_matrix"].matrices
        block["linear"] = {"accuracy_matrix": linear, "metrics": summarize_both(linear)}
    return block
