"""Upstream pretraining of a small timm ViT on the offline ``glyphs`` dataset, cached by config hash.

Without network there are no pretrained weights, yet continual learning with PEFT adapters presumes a
backbone that already knows something. This module trains one on 52-class letter recognition
(:mod:`avl_peft.cl.scenarios.glyphs`, letters from matplotlib's fonts) within a few CPU minutes and writes:

* ``model.safetensors``: the timm state dict, 52-class head included, loadable with
  ``avl_peft.create_backbone(name, checkpoint=..., num_classes=52, **kwargs)``;
* ``card.json``: what the weights are (timm name and kwargs, class order, input normalisation),
  how good (accuracy on held-out font families: jittered, and clean in both layout conventions, typographic
  and scaled to fill the canvas), how made (config and its hash, seed, fonts and families, versions, wall
  time) and the sha256 of ``model.safetensors``.

Both are written atomically, weights first and card last, so a card whose config hash and sha256
match is proof of a complete output; anything else (no card, unreadable card, truncated weights) is
treated as an interrupted build and rebuilt. :func:`find_or_build` keys a cache folder by config
name and hash, so a second run reuses the weights instead of training again.

Training recipe (tuned for about four minutes on two CPU cores): AdamW with linear warm-up and
cosine decay, label smoothing, jittered samples rendered as each batch is needed (the dataset is
effectively unlimited; 45 % of them laid out scaled to fill the canvas, ``data.fill_share``), position
embeddings initialised at the scale of the patch embeddings (see ``_train``: the largest single gain),
bf16 autocast where the CPU runs it natively
(``precision: auto``; fp32 elsewhere, where bf16 is emulated and about 10x slower) and
timm's patch dropout, which drops a fraction of the patch tokens during training only: the model and
its state dict are the same, and evaluation sees every token. Same config and seed give
bit-identical weights on the same machine and thread count.
"""

from .config import CARD, CARD_FORMAT, RECIPE_VERSION, WEIGHTS, PretrainConfig, config_hash, load_pretrain_config
from .outputs import (
    check_output,
    default_cache_dir,
    find_or_build,
    load_pretrained,
    output_dir,
    pretrain,
    pretrained_model,
    read_card,
)
from .training import accuracy, card_data_config, to_model_input

__all__ = [
    "CARD",
    "CARD_FORMAT",
    "RECIPE_VERSION",
    "PretrainConfig",
    "WEIGHTS",
    "accuracy",
    "check_output",
    "config_hash",
    "card_data_config",
    "default_cache_dir",
    "find_or_build",
    "load_pretrain_config",
    "load_pretrained",
    "output_dir",
    "pretrain",
    "pretrained_model",
    "read_card",
    "to_model_input",
]
