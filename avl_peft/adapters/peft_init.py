"""Starting an adapter from a Hugging Face peft LoRA folder (``method.init_from``).

A peft LoRA folder holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
``target_modules``…) and ``adapter_model.safetensors`` with ``base_model.model.<layer>.lora_A.weight``
(r, d_in) and ``…lora_B.weight`` (d_out, r) per layer; peft's update is ``ΔW = (α/r) · B A``. A method
whose adapter is such a pair (the ``imports_lora`` capability: LoRA) starts from it with the same ΔW:
``A ← lora_A``, ``B ← (α_peft/r) / s · lora_B`` for its own scale s. Layer names are relative to the timm
backbone (what peft saw), and every adapted layer must find its pair and every pair its layer, with the
run's rank: a ConfigError names what differs. Classifier weights in the folder (``modules_to_save``) are
not imported: a run's head is its scenario's. Reads are bounded (:mod:`avl_peft.safeio`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from ..errors import ConfigError, DataError
from ..safeio import load_json, read_safetensors
from ..validate import is_int, is_number
from .inject import backbone_root
from .stack import adapted_layers

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
# A ViT-L rank-64 LoRA on every linear layer is ~100 MB; 8 GiB bounds a planted huge file with room to spare.
MAX_BYTES = 8 << 30
# Options peft may set that change what the pair means; a plain LoRA has them off.
_UNSUPPORTED = ("use_dora", "use_rslora", "fan_in_fan_out")


def read_lora(folder: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{layer name: (lora_A, lora_B, peft scale α/r)} of a peft LoRA folder; DataError/ConfigError naming it."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"method.init_from: '{folder}' is not a folder; give a peft LoRA folder ({CONFIG} + {WEIGHTS})"
        )
    config = load_json(folder / CONFIG, what="peft adapter config", max_bytes=1 << 20)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ConfigError(f"method.init_from: '{folder / CONFIG}' is not a LoRA adapter (peft_type {got!r})")
    on = [k for k in _UNSUPPORTED if config.get(k)]
    if on:
        raise ConfigError(f"method.init_from: '{folder}' uses {', '.join(on)}; only a plain LoRA can start an adapter")
    data = read_safetensors(folder / WEIGHTS, what="peft adapter weights", max_bytes=MAX_BYTES)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_safetensors(data).items():
        m = _KEY.fullmatch(key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
    if not pairs:
        raise DataError(f"'{folder / WEIGHTS}' holds no lora_A/lora_B weights")
    out = {}
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise DataError(f"'{folder / WEIGHTS}' has lora_{next(iter(pair))} but not its partner for layer '{name}'")
        r = _pattern(config.get("rank_pattern"), name, config.get("r", 8))
        alpha = _pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        if not is_int(r) or r < 1 or not is_number(alpha):
            raise ConfigError(f"'{folder / CONFIG}': rank {r!r} / alpha {alpha!r} of layer '{name}' are not numbers")
        out[name] = (pair["A"], pair["B"], float(alpha) / r)
    return out


def _pattern(patterns: Any, name: str, default: Any) -> Any:
    """peft's rule: the first pattern key that matches the end of the layer name wins, else the default."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def check_lora(
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]], layers: dict[str, tuple[int, int]], rank: int, src: str
) -> None:
    """ConfigError unless ``lora`` has exactly ``layers`` (name -> (d_out, d_in)) with rank ``rank``."""
    missing, extra = sorted(set(layers) - set(lora)), sorted(set(lora) - set(layers))
    if missing or extra:
        detail = "; ".join(
            f"{label}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''}"
            for label, names in (("targeted here but not in the adapter", missing), ("not targeted here", extra))
            if names
        )
        raise ConfigError(
            f"method.init_from: the layers of '{src}' differ from this run's targets ({detail}); set method.targets "
            "to the adapter's layers"
        )
    for name, (a, b, _) in lora.items():
        d_out, d_in = layers[name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
            raise ConfigError(
                f"method.init_from: layer '{name}' of '{src}' has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, "
                f"which do not fit this backbone's {d_out}×{d_in} layer (another backbone?)"
            )
        if a.shape[0] != rank:
            raise ConfigError(
                f"method.init_from: layer '{name}' of '{src}' has rank {a.shape[0]} but the run has rank {rank}; set "
                f"method.options.rank: {a.shape[0]}"
            )


def init_from_lora(model: nn.Module, folder: str | Path, lora: dict | None = None) -> None:
    """Set every adapted layer's current branch from the peft LoRA in ``folder`` (read again unless given)."""
    lora = read_lora(folder) if lora is None else lora
    root, _ = backbone_root(model)
    prefix = f"{root}." if root else ""
    layers = {n.removeprefix(prefix): m for n, m in adapted_layers(model).items()}
    if not layers:
        raise ConfigError("method.init_from: the model has no adapters to start")
    first = next(iter(layers.values())).adapter
    if not type(first).imports_lora:
        raise ConfigError(f"method.init_from: method '{type(first).__name__}' cannot start from a peft LoRA")
    shapes = {n: tuple(m.base.weight.shape) for n, m in layers.items()}
    check_lora(lora, shapes, first.opts.rank, str(folder))
    with torch.no_grad():
        for name, layer in layers.items():
            a, b, scale = lora[name]
            layer.adapter.set_lora(a, b, scale)
