"""Hugging Face peft format: every method's update as a plain LoRA, loadable by ``PeftModel.from_pretrained``.

Each adapter exposes its update in factored form, ``ΔW = L R`` (:meth:`Adapter.factors`, exact to the dense
``delta_weight``, which the tests hold it to). A peft LoRA computes ``ΔW = (α/r) · lora_B lora_A``; with
``lora_B = L``, ``lora_A = R`` and ``α = r`` per layer (``rank_pattern``/``alpha_pattern`` where layers
differ) it is the same update. Per method that gives: LoRA and InfLoRA their ``s·B``, ``A``; SD-LoRA its
scaled directions side by side; WeGeFT its two factors ``s·W φ`` and ``ψ``; LoRETTA its tensor-train cores
contracted into A and B; PiSSA a rank-2r LoRA over the original weights, ``[s·B, −s·B₀]`` and ``[A; A₀]``
(update minus starting factors); stacked branches one LoRA of the summed rank; under ``policy: merge`` the
branches of every experience up to t side by side (the base stays the original weights). The class head
goes under ``modules_to_save``.

``--experience all`` writes one adapter folder per experience (``exp_<t>/``, peft's multi-adapter layout);
the card at the root records the base's identity, which :func:`load_peft` checks before loading.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from ...adapters import METHODS
from ...adapters.inject import backbone_root
from ...adapters.stack import adapted_layers
from ...errors import ConfigError, DataError
from ...safeio import check_safetensors, write_bytes_nofollow, write_text_nofollow
from .card import build_base, check_identity, pick_experience, read_card
from .runs import RunFolder, file_sha256

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
ADAPTER_MAX_BYTES = 8 << 30


def check_exportable(run: RunFolder) -> None:
    """ConfigError for runs whose model is not the base plus a low-rank update (say what to use instead)."""
    cls = METHODS.get(run.method)
    if not cls.adds_adapter:
        what = "the whole backbone trained" if cls.trains_backbone else "only the head trained"
        raise ConfigError(
            f"run '{run.path}' used '{run.method}', which adds no adapter ({what}); export it with --format timm "
            "(merged weights)"
        )
    if run.config["training"]["pretrain"]:
        raise ConfigError(
            f"run '{run.path}' began with a base session (training.pretrain: full fine-tuning of experience 0), so "
            "its adapters sit on changed weights, not on the recorded base; export it with --format timm"
        )


class FactorCollector:
    """``visit`` for :meth:`PEFTPlugin.restore`: every adapted layer's (L, R) as each experience left it.

    Under ``policy: merge`` experience t's adapter sits on weights that already hold the merged updates of
    0 … t−1, so the factors of every experience are kept side by side; otherwise a checkpoint holds the
    whole update (stacked branches included) and replaces the previous one.
    """

    def __init__(self, accumulate: bool):
        self.accumulate = accumulate
        self.factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = collections.defaultdict(list)

    def __call__(self, t: int, model: nn.Module) -> None:
        root, _ = backbone_root(model)
        prefix = f"{root}." if root else ""
        if not self.accumulate:
            self.factors.clear()
        with torch.no_grad():
            for name, layer in adapted_layers(model).items():
                w = layer.base.weight
                parts = [b.factors(w) for b in layer.branches()]
                self.factors[name.removeprefix(prefix)] += [
                    (left.detach().float(), right.detach().float()) for left, right in parts
                ]

    def lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (lora_B = L (d_out, q), lora_A = R (q, d_in)), branches concatenated."""
        return {
            name: (torch.cat([p[0] for p in parts], 1).contiguous(), torch.cat([p[1] for p in parts], 0).contiguous())
            for name, parts in self.factors.items()
        }


def adapter_files(
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]], head: dict[str, torch.Tensor], classifier: str, base: dict
) -> tuple[dict[str, Any], bytes]:
    """(adapter_config.json content, adapter_model.safetensors bytes) of one experience."""
    ranks = {name: a.shape[0] for name, (_, a) in lora.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    # peft matches pattern keys as regexes against module names: escaped full names hit one layer each.
    pattern = {re.escape(name): q for name, q in ranks.items() if q != r}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base["timm_name"],
        "r": r,
        "lora_alpha": r,  # α = r: peft's scale α/r is 1, so ΔW = lora_B lora_A exactly
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": [classifier],
        "inference_mode": True,
        "auto_mapping": {"base_model_class": "VisionTransformer", "parent_library": "timm.models.vision_transformer"},
    }
    tensors = {}
    for name, (b, a) in lora.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    for key, value in head.items():
        tensors[f"base_model.model.{classifier}.{key}"] = value
    return config, save_safetensors(tensors, metadata={"format": "pt"})


def write_adapter(out: Path, sub: str, config: dict[str, Any], weights: bytes) -> dict[str, Any]:
    folder = out / sub if sub else out
    write_bytes_nofollow(folder / WEIGHTS, weights, root=out)
    write_text_nofollow(folder / CONFIG, json.dumps(config, indent=2), root=out)
    return {"folder": sub or ".", "sha256": hashlib.sha256(weights).hexdigest(), "rank": config["r"]}


def check_base(base: nn.Module, folder: str | Path) -> None:
    """Raise ConfigError (naming the first differing tensor) unless ``base`` is the base ``folder`` was exported on.

    For loading with peft directly (``PeftModel.from_pretrained(base, folder)``): call it on the plain timm
    model first; :func:`load_peft` calls it itself.
    """
    folder = Path(folder)
    check_identity(base, read_card(folder, "peft"), "the base model")


def load_peft(folder: str | Path, *, experience: int | str | None = None, base: nn.Module | None = None) -> nn.Module:
    """The exported model of ``experience`` (default: the last exported) as a ``peft.PeftModel``.

    ``base``: your own timm model to load onto (built as the card's ``base`` says); by default it is built
    from the card. Either way its weights are checked against the card's identity first (ConfigError naming
    the first differing tensor: wrong weights would give silently wrong logits), and the adapter file
    against its sha256. With several experiences exported, every one is loaded as a named adapter
    (``exp_<t>``) and ``experience`` is made active (``model.set_adapter("exp_<t>")`` switches).
    """
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError("load_peft needs Hugging Face peft: pip install peft") from None
    folder = Path(folder)
    content = read_card(folder, "peft")
    active, _ = pick_experience(content, experience, folder)
    if base is None:
        base = build_base(content)
    check_identity(base, content, "the base model")
    model = None
    for name, entry in sorted(content["experiences"].items(), key=lambda kv: kv[1]["experience"]):
        sub = folder / entry["folder"]
        check_safetensors(sub / WEIGHTS, what="adapter weights", max_bytes=ADAPTER_MAX_BYTES)  # header checks
        if file_sha256(sub / WEIGHTS) != entry["sha256"]:
            raise DataError(f"adapter weights '{sub / WEIGHTS}' do not match the sha256 in the card (modified)")
        if model is None:
            model = PeftModel.from_pretrained(base, str(sub), adapter_name=name)
        else:
            model.load_adapter(str(sub), adapter_name=name)
    model.set_adapter(active)
    return model.eval()
