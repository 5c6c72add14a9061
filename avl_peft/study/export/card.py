"""What every export records about its base and head: the card, the base's identity, the timm head.

The card (``avl_peft_export.json``, at the root of the output folder) says which timm model to build and
with which weights, the identity of those weights (sha256 per tensor and over all of them, the classifier
excluded), the classes in head order, the input normalisation, and where the export came from (run folder,
config hash, pretrain card). The loaders (:mod:`.peft_format`, :mod:`.timm_format`) refuse a base whose
identity differs, naming the first tensor that does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ... import __version__
from ...backbones import create_backbone, data_config
from ...cl.training import seed_everything
from ...errors import ConfigError, DataError
from ...safeio import load_json, write_text_nofollow
from .runs import RunFolder

CARD = "avl_peft_export.json"
CARD_FORMAT = 1


def tensor_digest(t: torch.Tensor) -> str:
    """16 hex digits of sha256 over a tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return digest.hexdigest()[:16]


def identity(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The base weights' identity: a digest per tensor of ``model.state_dict()`` (names starting with one of
    ``skip`` left out: the classifier the export replaces) and one over all of them."""
    tensors = {k: tensor_digest(v) for k, v in model.state_dict().items() if not k.startswith(skip)}
    blob = json.dumps(tensors, sort_keys=True).encode()
    return {"sha256": hashlib.sha256(blob).hexdigest(), "tensors": tensors}


def check_identity(model: nn.Module, card: dict[str, Any], what: str) -> None:
    """ConfigError naming ``what`` and the first differing tensor unless ``model`` is the card's base."""
    want = card["base"]["identity"]
    have = identity(model, skip=tuple(card["base"]["classifier"]))
    if have["sha256"] == want["sha256"]:
        return
    source = card["base"]["weights"]
    differ = sorted(set(want["tensors"]) ^ set(have["tensors"])) or sorted(
        k for k in want["tensors"] if want["tensors"][k] != have["tensors"][k]
    )
    raise ConfigError(
        f"{what} is not the base this export was made on (expected {card['base']['timm_name']} with weights "
        f"{source.get('file') or source.get('source')}, identity {want['sha256'][:16]}; got {have['sha256'][:16]}, "
        f"first differing tensor: {differ[0] if differ else '?'}). Its logits would be silently wrong: load the "
        "weights the card names"
    )


def classifier_names(backbone: nn.Module) -> list[str]:
    heads = getattr(backbone, "pretrained_cfg", {}).get("classifier", "head")
    return [heads] if isinstance(heads, str) else list(heads)


def head_tensors(model: nn.Module, width: int) -> dict[str, torch.Tensor]:
    """The run's class head as a plain ``width``-way Linear in head order (unit i = class label i).

    Avalanche's IncrementalClassifier masks units of classes not trained yet with ``mask_value`` (-1000);
    those rows become weight 0, bias ``mask_value``, which gives the same logit exactly, and rows beyond
    the head's current size (classes of later experiences) are filled the same way.
    """
    head = model.head
    weight, bias = head.classifier.weight.detach(), head.classifier.bias.detach()
    active = getattr(head, "active_units", torch.ones(weight.shape[0], dtype=torch.bool)).bool()
    active = active if getattr(head, "masking", True) else torch.ones_like(active)
    mask_value = float(getattr(head, "mask_value", -1000.0))
    w = torch.zeros(width, weight.shape[1], dtype=weight.dtype)
    b = torch.full((width,), mask_value, dtype=bias.dtype)
    n = weight.shape[0]
    w[:n][active] = weight[active].cpu()
    b[:n][active] = bias[active].cpu()
    return {"weight": w.contiguous(), "bias": b.contiguous()}


def active_classes(model: nn.Module) -> list[int]:
    head = model.head
    units = getattr(head, "active_units", torch.ones(head.classifier.weight.shape[0]))
    return [int(i) for i in torch.nonzero(units.bool()).flatten()]


def base_block(run: RunFolder, fresh: nn.Module, width: int) -> dict[str, Any]:
    """The card's ``base``: the timm call that builds the base, its weights and their identity."""
    bb = run.config["backbone"]
    classifier = classifier_names(fresh.backbone)
    return {
        "timm_name": bb["name"],
        "kwargs": dict(bb["kwargs"]),
        "num_classes": width,
        "classifier": classifier,
        "weights": dict(run.results.get("backbone_weights") or {"source": "random_init"})
        | {"seed": run.config["seed"]},
        "identity": identity(fresh.backbone, skip=tuple(classifier)),
    }


def card(run: RunFolder, base: dict[str, Any], fmt: str, fresh: nn.Module) -> dict[str, Any]:
    results = run.results
    return {
        "format": fmt,
        "card_format": CARD_FORMAT,
        "avl_peft": __version__,
        "timm": timm.__version__,
        "run": {
            "folder": str(run.path.resolve()),
            "id": (results.get("run") or {}).get("id"),
            "method": run.method,
            "policy": run.config["method"]["policy"],
            "options": run.options,
            "base_session": bool(run.config["training"]["pretrain"]),
            "config_hash": run.config_hash(),
            "n_experiences": run.n_experiences,
        },
        "pretrain_card": {k: v for k, v in base["weights"].items() if k != "seed"} if base["weights"].get(
            "source") == "pretrain" else None,
        "base": base,
        "classes": list(range(base["num_classes"])),  # head order: unit i is class label i
        "classes_order": results.get("classes_order", []),
        "normalisation": data_config(fresh.backbone),
        "experiences": {},
    }  # fmt: skip


def write_card(out: Path, content: dict[str, Any]) -> None:
    write_text_nofollow(out / CARD, json.dumps(content, indent=2, default=str), root=out)


def read_card(folder: str | Path, fmt: str) -> dict[str, Any]:
    folder = Path(folder)
    content = load_json(folder / CARD, what="export card", max_bytes=16 << 20)
    if not isinstance(content, dict) or content.get("format") != fmt or content.get("card_format") != CARD_FORMAT:
        got = content.get("format") if isinstance(content, dict) else None
        raise DataError(f"'{folder / CARD}' is not a {fmt} export card of format {CARD_FORMAT} (format {got!r})")
    return content


def pick_experience(content: dict[str, Any], experience: int | str | None, folder: Path) -> tuple[str, dict]:
    """(adapter name, entry) of ``experience`` (an index, ``exp_<t>``, or None for the last one exported)."""
    entries = content["experiences"]
    if experience is None:
        name = max(entries, key=lambda k: entries[k]["experience"])
    else:
        name = experience if isinstance(experience, str) else f"exp_{int(experience)}"
    if name not in entries:
        raise ConfigError(f"export '{folder}' has no experience {experience!r}; it holds {', '.join(entries)}")
    return name, entries[name]


def build_base(content: dict[str, Any]) -> nn.Module:
    """The timm model the card names, with the weights it names (the classifier is fresh)."""
    base = content["base"]
    weights = base["weights"]
    source = weights.get("source")
    checkpoint = weights.get("file") if source in ("pretrain", "checkpoint") else None
    seed_everything(int(weights.get("seed", 0)))  # random_init: the run's seed gives its weights back
    # Built as the run built it (a 1-way head, as avl-peft's feature backbone: constructing a head of another
    # size would draw other random numbers before timm's init), then given the export's head size.
    model = create_backbone(
        base["timm_name"],
        pretrained=source == "timm_pretrained",
        checkpoint=checkpoint,
        num_classes=1,
        **base["kwargs"],
    )
    model.reset_classifier(int(base["num_classes"]))
    return model
