"""The rows of the compatibility table (``compat.py``): how strategies that are not registered are built
on the table's tiny ViT, the options registered ones run with, and what the notes under the table say."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import avalanche.training as avl_training
import torch
from torch import nn

from avl_peft.backbones import create_backbone
from avl_peft.cl.backbone import ContinualViT, create_continual_model

VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}
N_EXP, PER_CLASS, BATCH = 2, 8, 8  # 16 images per experience: 2 iterations


# -- models and builders for strategies that are not registered -----------------------------------------


def _vit_features() -> nn.Module:
    backbone = create_backbone("vit_tiny_patch16_224", num_classes=1, **VIT)
    backbone.reset_classifier(0)
    return backbone


def _common(plugins: list) -> dict[str, Any]:
    return {"train_mb_size": BATCH, "train_epochs": 1, "eval_mb_size": 16, "plugins": plugins, "evaluator": None}


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05)


def _icarl(plugins: list) -> Any:
    from avalanche.training import ICaRL

    fe, clf = _vit_features(), nn.Linear(16, 2 * N_EXP)
    opt = torch.optim.SGD([*fe.parameters(), *clf.parameters()], lr=0.05)
    return ICaRL(feature_extractor=fe, classifier=clf, optimizer=opt, memory_size=8, buffer_transform=None,
                 fixed_memory=True, **_common(plugins))  # fmt: skip


def _scr(plugins: list) -> Any:
    from avalanche.models import SCRModel
    from avalanche.training import SCR

    model = SCRModel(feature_extractor=_vit_features(), projection=nn.Sequential(nn.Linear(16, 16), nn.ReLU()))
    return SCR(model=model, optimizer=_sgd(model), mem_size=8, batch_size_mem=4, **_common(plugins))


def _feature_replay(plugins: list) -> Any:
    from avalanche.training import FeatureReplay, MaskedCrossEntropy

    model = create_continual_model("vit_tiny_patch16_224", **VIT)
    # A criterion of its own: FeatureReplay's default MaskedCrossEntropy() is one object shared by every
    # instance (a mutable default argument) and carries the classes of earlier runs.
    return FeatureReplay(model=model, optimizer=_sgd(model), criterion=MaskedCrossEntropy(), last_layer_name="head",
                         mem_size=8, batch_size_mem=4, **_common(plugins))  # fmt: skip


def _fixed_head_model() -> nn.Module:
    """DER and others store or compare logits across experiences: a fixed-size head over every class."""
    return ContinualViT(_vit_features(), nn.Linear(16, 2 * N_EXP))


def _simple(cls_name: str, make_model: Callable[[], nn.Module] = lambda: create_continual_model(
        "vit_tiny_patch16_224", **VIT), **kw: Any) -> Callable[[list], Any]:  # fmt: skip
    def build(plugins: list) -> Any:
        model = make_model()
        cls = getattr(avl_training, cls_name)
        return cls(model=model, optimizer=_sgd(model), criterion=nn.CrossEntropyLoss(), **kw, **_common(plugins))

    return build


def _er_aml(plugins: list) -> Any:
    model = create_continual_model("vit_tiny_patch16_224", **VIT)
    # A class's share of the memory must hold a whole batch: ER-AML cycles a drop_last loader per class,
    # which never yields (and loops forever) when the share is smaller.
    return avl_training.ER_AML(model=model, feature_extractor=model.backbone, optimizer=_sgd(model),
                               criterion=nn.CrossEntropyLoss(), mem_size=4 * PER_CLASS, batch_size_mem=4,
                               **_common(plugins))  # fmt: skip


def _generative_replay(plugins: list) -> Any:
    from avalanche.models import MlpVAE
    from avalanche.models.generator import VAE_loss
    from avalanche.training import VAETraining

    generator = MlpVAE((3, VIT["img_size"], VIT["img_size"]), nhid=2)
    gen = VAETraining(model=generator, optimizer=torch.optim.Adam(generator.parameters(), lr=1e-3),
                      criterion=VAE_loss, train_mb_size=BATCH, train_epochs=1, evaluator=None)  # fmt: skip
    model = create_continual_model("vit_tiny_patch16_224", **VIT)
    return avl_training.GenerativeReplay(model=model, optimizer=_sgd(model), criterion=nn.CrossEntropyLoss(),
                                         generator_strategy=gen, **_common(plugins))  # fmt: skip


def _streaming_lda(plugins: list) -> Any:
    return avl_training.StreamingLDA(slda_model=_vit_features(), criterion=nn.CrossEntropyLoss(), input_size=16,
                                     num_classes=2 * N_EXP, **_common(plugins))  # fmt: skip


# Why a row looks the way it does, and why a strategy that runs is not registered (shown under the table).
NOTES = {
    "AETraining": "trains an auto-encoder of its own: PEFTPlugin raises ConfigError",
    "VAETraining": "trains a VAE of its own: PEFTPlugin raises ConfigError",
    "AR1": "builds its own MobileNet: PEFTPlugin raises ConfigError",
    "PNNStrategy": "needs a progressive network (PNN) of its own: PEFTPlugin raises ConfigError",
    "PackNet": "prunes a PackNet model of its own: PEFTPlugin raises ConfigError",
    "ExpertGateStrategy": "grows experts of its own: PEFTPlugin raises ConfigError",
    "LearningToPrompt": "registered as l2p on the run's own ViT: it trains prompts, so its builder drops "
    "PEFTPlugin (use method: head); Avalanche's class builds a 224 px ViT of its own",
    "BiC": "runs with TorchBiCPlugin (Avalanche's BiC passes verbose to torch's MultiStepLR); not registered: "
    "its state (bias layer, validation buffers, old model) is not saved for exact resume yet",
    "CWRStar": "CWR* freezes every layer but its classifier, adapters included",
    "CoPE": "run with a fixed-width head (CoPE's prototypes have the output's width); not registered: the run's "
    "head grows with the classes",
    "DER": "run with a fixed-size head (DER stores logits); not registered: the run's head grows with the classes",
    "ER_AML": "run with a memory whose per-class share holds a batch (a smaller share loops forever on "
    "Avalanche's drop_last loader); not registered for that reason",
    "FeatureReplay": "replaces the model's head and replays stored features; not registered (its feature buffer "
    "is not saved for exact resume yet)",
    "GenerativeReplay": "run with a generator for the images' size (MlpVAE on 3×32×32; the default is for 28×28 "
    "MNIST); not registered: it needs a generator per scenario",
    "ICaRL": "needs a feature extractor plus its own classifier and NCM evaluation; not registered",
    "SCR": "needs a feature extractor plus a projection head and NCM evaluation; not registered",
    "JointTraining": "trains once on the whole stream (an offline upper bound), not per experience; cumulative is "
    "the registered upper bound",
    "StreamingLDA": "fits LDA statistics on frozen features without gradients: nothing else trains",
    "GSS_greedy": "fails in Avalanche's own gradient-based sample selection on this setup",
    "SynapticIntelligence": "path-integral importance: refused under merge (and stack, or after a base session)",
    "(rwalk)": "path-integral importance: refused under merge (and stack, or after a base session)",
}
# Trained once on the whole stream (an offline upper bound), not experience by experience.
TRAIN_ONCE = {"JointTraining"}
# Not registered: how to build each (Avalanche's own test setup on this model) or why it is not run.
UNREGISTERED: dict[str, Callable[[list], Any] | str] = {
    "BiC": _simple("BiC", mem_size=8, stage_2_epochs=1, val_percentage=0.5),
    "CWRStar": _simple("CWRStar", cwr_layer_name="head.classifier"),
    "CoPE": _simple("CoPE", make_model=_fixed_head_model, mem_size=8, n_classes=2 * N_EXP, p_size=2 * N_EXP),
    "DER": _simple("DER", make_model=_fixed_head_model, mem_size=8, batch_size_mem=4),
    "ER_AML": _er_aml,
    "FeatureReplay": _feature_replay,
    "GSS_greedy": _simple("GSS_greedy", mem_size=16, input_size=[3, VIT["img_size"], VIT["img_size"]]),
    "GenerativeReplay": _generative_replay,
    "ICaRL": _icarl,
    "JointTraining": _simple("JointTraining"),
    "SCR": _scr,
    "StreamingLDA": _streaming_lda,
}
