"""The upstream probe a run asks for (``upstream:``): checked at config load, built when the run starts.

``upstream.dataset`` is a scenario (e.g. ``glyphs``, the letters the glyph-pretrained backbone learned, its
test set from the fonts held out by ``upstream.seed``: use the pretraining seed, the default 0) or
``imagefolder:<path>`` (:mod:`avl_peft.cl.scenarios.upstream`). ``upstream.head: checkpoint`` scores the
current backbone features with the checkpoint's own classifier, copied aside and frozen when the run starts;
it needs ``backbone.checkpoint`` (or ``backbone.pretrain``). ``knn`` classifies the query set by cosine k-NN
against the reference set, both embedded with the current backbone: it works for any backbone.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..backbones import data_config
from ..cl.scenarios.upstream import upstream_images, upstream_sets
from ..errors import ConfigError
from ..instruments.upstream import UpstreamRetentionPlugin, build_probe, checkpoint_classifier

HEADS = ("checkpoint", "knn")

# The upstream images are held in memory as float32 at the backbone's input size.
UPSTREAM_MAX_BYTES = 4 << 30


def check_upstream(cfg: dict, img_size: int) -> None:
    """Config-load checks of the ``upstream`` section: the dataset exists, and the images it would hold fit.

    For ``imagefolder:`` the folder is listed and the header of every image the run would read is checked
    (format, pixel budget; nothing is decoded), so a bad file fails the dry-run, not the run.
    """
    up = cfg.get("upstream") or {}
    dataset = up.get("dataset")
    if dataset is None:
        return
    n_images = upstream_images(dataset, up["per_class"], up["head"] == "knn", img_size)
    size = n_images * 3 * img_size**2 * 4
    if size > UPSTREAM_MAX_BYTES:
        raise ConfigError(
            f"upstream.per_class: {n_images:,} upstream images at {img_size}x{img_size} take {size / 2**30:.1f} GiB "
            f"in memory (limit {UPSTREAM_MAX_BYTES / 2**30:.0f} GiB); lower upstream.per_class"
        )
    bb = cfg["backbone"]
    if up["head"] == "checkpoint" and bb["checkpoint"] is None and bb.get("pretrain") is None:
        raise ConfigError(
            "upstream.head: checkpoint reads the pretrained classifier from backbone.checkpoint (or "
            "backbone.pretrain); set one, or use upstream.head: knn, which works for any backbone"
        )


def build_upstream(cfg: dict, model: nn.Module, checkpoint: str | Path | None) -> UpstreamRetentionPlugin | None:
    """The plugin measuring upstream accuracy before and after every experience, or None when not configured."""
    up = cfg.get("upstream") or {}
    if up.get("dataset") is None:
        return None
    knn = up["head"] == "knn"
    sets = upstream_sets(
        up["dataset"],
        per_class=up["per_class"],
        seed=cfg["seed"],
        data_seed=up["seed"],
        reference=knn,
        **data_config(model.backbone),
    )
    bb = cfg["backbone"]
    classifier = None if knn else checkpoint_classifier(bb["name"], checkpoint, **bb["kwargs"])
    return UpstreamRetentionPlugin(
        build_probe(sets, up["head"], k=up["k"], classifier=classifier, dataset=up["dataset"])
    )
