"""The pretraining recipe: the model, its inputs, and the training loop on glyphs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import data_config
from ..cl.scenarios.glyph_fonts import font_family
from ..cl.scenarios.glyphs import CLASSES, GlyphDataset, render_filled
from ..errors import DataError
from ..hardware import resolve_precision


def _create_model(cfg: Mapping[str, Any], checkpoint: Path | None = None, patch_drop: float = 0.0) -> nn.Module:
    import avl_peft

    bb = cfg["backbone"]
    kwargs = dict(bb["kwargs"])
    if patch_drop:
        kwargs["patch_drop_rate"] = patch_drop  # a training-time option: no parameters, same state dict
    return avl_peft.create_backbone(bb["name"], checkpoint=checkpoint, num_classes=len(CLASSES), **kwargs)


def card_data_config(model: nn.Module) -> dict[str, Any]:
    """The input format the weights expect, as the card records it: the backbone's own data config
    (:func:`avl_peft.backbones.data_config`, what a run normalises with), grey glyphs replicated to RGB."""
    dc = data_config(model)
    return {
        "img_size": dc["img_size"],
        "in_chans": 3,
        "grey_to_rgb": True,
        "mean": [float(m) for m in dc["mean"]],
        "std": [float(s) for s in dc["std"]],
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
    dcfg = card_data_config(model)  # img_size is data.img_size: the config refuses a backbone that differs
    common = {
        "seed": seed,
        "img_size": data["img_size"],
        "test_fraction": data["test_fraction"],
        "fonts": data["fonts"],
    }
    train_set = GlyphDataset(
        "train", data["train_per_class"], jitter=data["jitter"], fill_share=data["fill_share"], **common
    )
    test_set = GlyphDataset("test", data["test_per_class"], jitter=data["jitter"], **common)  # typographic

    steps_per_epoch = len(train_set) // tr["batch_size"]  # >= 1: the config checks batch_size
    total = steps_per_epoch * tr["epochs"]
    warmup_steps = max(1, round(tr["warmup"] * total))
    opt = torch.optim.AdamW(_param_groups(model, tr["weight_decay"]), lr=tr["lr"], betas=(0.9, 0.99))
    order_rng = torch.Generator().manual_seed(seed)
    # auto -> bf16 only where the CPU multiplies bf16 natively; an explicit bf16 elsewhere warns (emulated)
    use_bf16 = resolve_precision(tr["precision"], torch.device("cpu"), key="pretrain training.precision") == "bf16"
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
    # Both layout conventions, clean, on the held-out families: does the result depend on how one renders?
    clean = GlyphDataset("test", len(test_set.fonts), jitter=0.0, **common).as_tensors()
    filled = render_filled(test_set.fonts, data["img_size"])
    facts = {
        "test_accuracy": accuracy(model, test_images, test_labels, dcfg),  # held-out families, jittered
        "test_accuracy_typographic": accuracy(model, *clean, dcfg),
        "test_accuracy_filled": accuracy(model, *filled, dcfg),
        "train_accuracy_running_last_epoch": correct / max(1, seen),  # while training: patch drop on, weights moving
        "final_loss": loss_value,
        "steps": total,
        "samples_seen": total * tr["batch_size"],
        "test_images": len(test_labels),
        "font_pool": data["fonts"],
        "train_fonts": [f.name for f in train_set.fonts],
        "test_fonts": [f.name for f in test_set.fonts],
        "train_families": sorted({font_family(f)[0] for f in train_set.fonts}),
        "test_families": sorted({font_family(f)[0] for f in test_set.fonts}),
        "data_config": dcfg,
    }
    return model, facts


# ---------------------------------------------------------------------------------------------------
# Outputs: write, verify, cache
# ---------------------------------------------------------------------------------------------------
