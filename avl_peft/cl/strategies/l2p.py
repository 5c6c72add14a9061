"""L2P: Avalanche's LearningToPrompt as a baseline on the harness's own backbone (see :func:`build_l2p`).

L2P owns its model (a prompted ViT rebuilt from the run's backbone) and trains prompts, not weights, so its
registry entry says ``owns_model=True, trains_weights=False`` and checks the run config itself.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import torch
from avalanche.models import IncrementalClassifier
from avalanche.training import LearningToPrompt, MaskedCrossEntropy
from avalanche.training.templates import SupervisedTemplate
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ...adapters import METHODS
from ...errors import ConfigError
from ...validate import check_int, check_number, is_int
from ..checkpoints import CheckpointPlugin
from ..heads import prompted_vit_features
from ..plugin import PEFTPlugin
from .base import STRATEGIES, StrategySpec

# --------------------------------------------------------------------------------------------------
# L2P: Avalanche's LearningToPrompt on the harness's own backbone
# --------------------------------------------------------------------------------------------------


def _timm_vit(model: nn.Module) -> nn.Module:
    """The timm VisionTransformer inside a harness model (ContinualViT.backbone) or the model itself."""
    for candidate in (getattr(model, "backbone", None), model):
        if isinstance(candidate, VisionTransformer):
            return candidate
    raise ConfigError(
        f"strategy l2p needs a timm VisionTransformer backbone, got {type(model).__name__}; pick a vit_* backbone"
    )


def vit_architecture(vit: nn.Module) -> dict[str, Any]:
    """The ViTWithPrompt keyword arguments that rebuild ``vit``'s architecture; ConfigError if it cannot.

    ViTWithPrompt has its own forward (patch embed -> prompts -> cls -> pos -> blocks -> norm), so
    backbones whose forward does more than that (register tokens, pre-norm, embedding norm, no class
    token, dynamic image size, attention pooling, QK-norm) are refused rather than silently changed.
    """
    block = vit.blocks[0]
    unsupported = {
        "register tokens": getattr(vit, "reg_token", None) is not None,
        "no class token": getattr(vit, "cls_token", None) is None,
        "pre-norm (norm_pre)": not isinstance(getattr(vit, "norm_pre", nn.Identity()), nn.Identity),
        "patch-embedding norm": not isinstance(getattr(vit.patch_embed, "norm", nn.Identity()), nn.Identity),
        "dynamic image size": bool(getattr(vit, "dynamic_img_size", False)),
        "attention pooling": getattr(vit, "attn_pool", None) is not None,
        "QK-norm": not isinstance(getattr(block.attn, "q_norm", nn.Identity()), nn.Identity),
        "no position embedding": getattr(vit, "pos_embed", None) is None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(
            f"strategy l2p cannot rebuild this backbone as Avalanche's prompted ViT (it has {', '.join(bad)}); "
            "use a plain ViT such as vit_base_patch16_224.augreg_in21k or vit_tiny_patch16_224"
        )
    ls = getattr(block, "ls1", nn.Identity())
    return {
        "img_size": tuple(vit.patch_embed.img_size),
        "patch_size": tuple(vit.patch_embed.patch_size),
        "in_chans": vit.patch_embed.proj.in_channels,
        "embed_dim": vit.embed_dim,
        "depth": len(vit.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "init_values": 1e-5 if hasattr(ls, "gamma") else None,  # creates LayerScale; the value is loaded
        "class_token": True,
        "no_embed_class": bool(getattr(vit, "no_embed_class", False)),
        "fc_norm": not isinstance(getattr(vit, "fc_norm", nn.Identity()), nn.Identity),
        "global_pool": vit.global_pool,
    }


def _load_backbone(target: nn.Module, vit: nn.Module) -> None:
    """Copy ``vit``'s weights into a ViTWithPrompt (position embeddings extended for the prompts)."""
    # Lazy: avalanche.models.timm_vit imports deprecated timm paths and warns at import time.
    from avalanche.models.timm_vit import checkpoint_filter_fn

    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    state = checkpoint_filter_fn(state, target)
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "prompt."))]
    if missing or unexpected:
        raise ConfigError(
            f"strategy l2p could not copy the backbone into the prompted ViT (missing: {missing[:4]}, "
            f"unexpected: {unexpected[:4]})"
        )


def build_prompted_vits(
    model: nn.Module,
    *,
    pool_size: int,
    prompt_length: int,
    top_k: int,
    num_classes: int | None = None,
    embedding_key: str = "cls",
    prompt_init: str = "uniform",
    head_type: str = "prompt",
    batchwise_prompt: bool = False,
    use_prompt_mask: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """(prompted ViT, frozen query ViT) with ``model``'s backbone architecture and weights.

    The classifier is an Avalanche ``IncrementalClassifier`` (grows with the classes, masks the ones not
    trained yet), as for every other method here, so ``num_classes`` is only an optional initial size.
    """
    for key, value, low in (("pool_size", pool_size, 1), ("prompt_length", prompt_length, 1), ("top_k", top_k, 1)):
        if not is_int(value) or value < low:
            raise ConfigError(f"strategy.options.{key}: must be an integer >= {low}, got {value!r}")
    if top_k > pool_size:
        raise ConfigError(f"strategy.options.top_k ({top_k}) cannot exceed pool_size ({pool_size})")
    from avalanche.models.timm_vit import ViTWithPrompt  # lazy: see _load_backbone

    vit = _timm_vit(model)
    arch = vit_architecture(vit)
    prompted = ViTWithPrompt(
        **arch,
        num_classes=0,
        prompt_pool=True,
        pool_size=pool_size,
        prompt_length=prompt_length,
        top_k=top_k,
        prompt_key=True,
        embedding_key=embedding_key,
        prompt_init=prompt_init,
        head_type=head_type,
        batchwise_prompt=batchwise_prompt,
        use_prompt_mask=use_prompt_mask,
    )
    _load_backbone(prompted, vit)
    for n, p in prompted.named_parameters():  # as LearningToPrompt: only prompts (+ keys) and the head train
        p.requires_grad_(n.startswith(("prompt.", "head.")))
    query = ViTWithPrompt(**arch, num_classes=0)  # head_type "token": pre_logits is the [CLS] feature
    _load_backbone(query, vit)
    # Both ViTs are the same frozen backbone: share its modules (one copy in memory, as for the other
    # methods); only the position embeddings differ (the prompted one has slots for the prompts).
    query.patch_embed, query.blocks, query.norm = prompted.patch_embed, prompted.blocks, prompted.norm
    query.cls_token = prompted.cls_token
    for p in query.parameters():
        p.requires_grad_(False)
    prompted.head = IncrementalClassifier(arch["embed_dim"], initial_out_features=num_classes or 2)
    return prompted, query


class L2P(LearningToPrompt):
    """Avalanche's LearningToPrompt on a prebuilt prompted ViT (see :func:`build_l2p`).

    LearningToPrompt's ``__init__`` builds its models itself from ``avalanche.models.vit`` names (ViT at
    224 px) and hard-codes a 768-wide head; this subclass takes the models instead and keeps the rest of
    LearningToPrompt: its Adam optimizer, rebuilt at every experience with ``lr``; its loss (cross-entropy
    minus ``sim_coefficient`` times the prompt-key similarity); prompts selected by the frozen query ViT.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        original_vit: nn.Module,
        criterion: Any = None,
        lr: float = 0.03,
        sim_coefficient: float = 0.1,
        use_mask: bool | None = None,
        train_prompt_mask: bool = False,
        device: Any = "cpu",
        **template_kwargs: Any,
    ):

        criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.num_classes = model.head.classifier.out_features
        self.lr, self.sim_coefficient = lr, sim_coefficient
        device = torch.device(device) if device is not None else torch.device("cpu")
        optimizer = torch.optim.Adam(model.parameters(), betas=(0.9, 0.999), lr=lr)
        SupervisedTemplate.__init__(
            self, model=model, optimizer=optimizer, criterion=criterion, device=device, **template_kwargs
        )
        self._criterion = criterion
        self.use_cls_features, self.use_vit = True, True
        self.train_prompt_mask = train_prompt_mask
        # L2P trains only the current classes' logits. A MaskedCrossEntropy criterion (the harness's
        # train_mask) already decides which logits enter the loss; masking them to -inf as well would give
        # 0·inf = NaN under mask "seen", so L2P's own mask is used only with a plain criterion.
        self.use_mask = not isinstance(criterion, MaskedCrossEntropy) if use_mask is None else use_mask
        self.original_vit = original_vit.to(device)

    def forward(self):
        with torch.no_grad():
            cls_features = self.original_vit(self.mb_x)["pre_logits"]
        self.res = self.model(
            x=self.mb_x, task_id=self.mb_task_id, cls_features=cls_features, train=self.train_prompt_mask
        )
        logits = self.res["logits"]
        if self.use_mask and self.is_training:
            # LearningToPrompt masks np.arange(self.num_classes); the head here grows, so use its width.
            current = np.asarray(list(self.experience.classes_in_this_experience), dtype=np.int64)
            not_mask = np.setdiff1d(np.arange(logits.shape[1]), current)
            index = torch.as_tensor(not_mask, dtype=torch.int64, device=logits.device)
            logits = logits.index_fill(dim=1, index=index, value=float("-inf"))
        return logits


def _frozen_probe(method: str) -> bool:
    """Whether ``method`` adds nothing and trains no backbone weight (the ``head`` baseline): what L2P is."""
    cls = METHODS.get(method)
    return not cls.adds_adapter and not cls.trains_backbone


def build_l2p(
    model: nn.Module,
    optimizer: Any,
    criterion: Any,
    *,
    plugins: list | None = None,
    pool_size: int = 10,
    prompt_length: int = 5,
    top_k: int = 5,
    lr: float = 0.03,
    sim_coefficient: float = 0.1,
    num_classes: int | None = None,
    **template_kwargs: Any,
) -> L2P:
    """L2P as a baseline in the same harness (same backbone, scenario, evaluator and loss mask).

    - The prompted ViT and the frozen query ViT are rebuilt from ``model``'s timm backbone: same
      architecture (any plain timm ViT, tiny ones included) and same weights (pretrained or checkpoint).
      ``model`` itself and ``optimizer`` are not trained: L2P owns its model and rebuilds its Adam (``lr``)
      every experience, so ``training.lr``/``training.optimizer`` do not apply.
    - :class:`~avl_peft.cl.plugin.PEFTPlugin` is dropped from ``plugins``: L2P trains prompts on a frozen ViT
      and an adapter method (or a ``pretrain`` base session) does not apply. Use ``method: head`` with
      ``l2p``: the results then say what trained (prompts + head). Its ``checkpoint_dir`` is kept: a
      :class:`~avl_peft.cl.checkpoints.CheckpointPlugin` writes the prompts and head after each experience.
    - The head is an ``IncrementalClassifier`` (grows, masks untrained classes), so accuracies mean the
      same as for every other method and ``num_classes`` (the scenario's class count) is optional.
    """
    kept = []
    for plugin in plugins or []:
        if not isinstance(plugin, PEFTPlugin):
            kept.append(plugin)
            continue
        if not _frozen_probe(plugin.method) or plugin.pretrain:
            warnings.warn(
                f"strategy l2p trains its own prompts on a frozen ViT: method '{plugin.method}'"
                f"{' and pretrain' if plugin.pretrain else ''} do not apply (use method: head)",
                stacklevel=2,
            )
        if plugin.checkpoint_dir is not None:
            kept.append(CheckpointPlugin(plugin.checkpoint_dir, method="l2p", policy=plugin.policy))
    prompted, query = build_prompted_vits(
        model, pool_size=pool_size, prompt_length=prompt_length, top_k=top_k, num_classes=num_classes
    )
    return L2P(
        model=prompted,
        original_vit=query,
        criterion=criterion,
        lr=lr,
        sim_coefficient=sim_coefficient,
        plugins=kept,
        **template_kwargs,
    )


@dataclasses.dataclass
class L2POptions:
    pool_size: int = 10  # prompts in the pool (L2P's default)
    prompt_length: int = 5  # tokens per prompt
    top_k: int = 5  # prompts selected per image
    lr: float = 0.03  # L2P's own Adam learning rate (training.lr does not apply)
    sim_coefficient: float = 0.1  # weight of the prompt-key similarity term in the loss

    def __post_init__(self) -> None:
        for key in ("pool_size", "prompt_length", "top_k"):
            check_int(f"strategy.options.{key}", getattr(self, key), minimum=1)
        if self.top_k > self.pool_size:
            raise ConfigError(f"strategy.options.top_k ({self.top_k}) cannot exceed pool_size ({self.pool_size})")
        check_number("strategy.options.lr", self.lr, low=0.0, exclusive_low=True)
        check_number("strategy.options.sim_coefficient", self.sim_coefficient, low=0.0)


def check_l2p_run(cfg: dict) -> None:
    """L2P's own constraints on a run config (called by the schema before anything trains)."""
    if cfg["training"]["task_incremental"]:
        raise ConfigError("strategy l2p brings its own class-incremental head; set training.task_incremental: false")
    if not _frozen_probe(cfg["method"]["name"]):
        raise ConfigError(
            "strategy l2p trains its own prompts on a frozen ViT and takes no adapter: set method.name: head "
            "for it (in a grid, add it as a variant: {strategy.name: l2p, method.name: head})"
        )
    if cfg["training"]["pretrain"]:
        raise ConfigError("strategy l2p has no base session; set training.pretrain: false")


STRATEGIES.register("l2p", "Learning to Prompt baseline (Avalanche LearningToPrompt; pool_size, top_k, lr)")(
    StrategySpec(
        "l2p",
        "Learning to Prompt baseline (Avalanche LearningToPrompt; pool_size, top_k, lr)",
        build_l2p,
        L2POptions,
        owns_model=True,
        trains_weights=False,
        check=check_l2p_run,
        features=prompted_vit_features,
        avalanche="LearningToPrompt",
        tiny_options={"pool_size": 2, "prompt_length": 1, "top_k": 1},
    )
)
