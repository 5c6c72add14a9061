"""The upstream probe a run asks for (``upstream:``): which data, which classifier, checked at config load.

``upstream.dataset`` is

* ``glyphs`` — the offline letters the glyph-pretrained backbone learned (:mod:`avl_peft.cl.scenarios.glyphs`); the
  test set is drawn from the fonts held out by ``upstream.seed`` (use the pretraining seed, the default 0,
  so no test font was seen in pretraining);
* an offline scenario name (``digits``, ``mnist5k``, ``synthetic``): all its classes, its own train/test
  split;
* ``imagefolder:<path>`` — ``<path>/<class>/*.png|jpg``, classes in sorted folder order; for ``knn`` each
  class' files are split in half (seeded) into the reference and the query set; for ``checkpoint`` every
  image is a query and the number of classes must equal the checkpoint classifier's.

``upstream.head: checkpoint`` scores the current backbone features with the checkpoint's own classifier,
copied aside and frozen when the run starts (it never trains, it is not the continual model's head); it
needs ``backbone.checkpoint`` (or ``backbone.pretrain``). ``knn`` classifies the query set by cosine k-NN
against the reference set, both embedded with the current backbone — it works for any backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cl.backbone import create_backbone, data_config, read_state_dict
from ..cl.scenarios import SCENARIOS, build_scenario
from ..cl.scenarios.base import CLASS_COUNTS
from ..cl.scenarios.glyphs import GlyphDataset
from ..errors import ConfigError, DataError
from ..instruments.upstream import UpstreamProbe, UpstreamRetentionPlugin, read_imagefolder
from ..safeio.images import check_image, class_folders, image_files

IMAGEFOLDER = "imagefolder:"
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
    per_class = up["per_class"] * (1 if up["head"] == "checkpoint" else 2)  # knn: a reference split as well
    if dataset.startswith(IMAGEFOLDER):
        folder = Path(dataset[len(IMAGEFOLDER) :]).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"upstream.dataset: image folder '{folder}' does not exist (expected <path>/<class>/*.png)"
            )
        n_images = _check_imagefolder(folder, 2 * up["per_class"], img_size)
    elif dataset == "glyphs":
        n_images = 52 * per_class
    elif dataset in SCENARIOS:
        n_classes = CLASS_COUNTS[dataset][0]({}, img_size) if dataset in CLASS_COUNTS else 0
        n_images = n_classes * per_class
    else:
        names = ["glyphs", *SCENARIOS.names()]
        raise ConfigError(
            f"upstream.dataset: unknown dataset '{dataset}'; use glyphs, a scenario ({', '.join(names[1:])}) "
            "or imagefolder:<path>"
        )
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


def _to_input(images: torch.Tensor, dc: dict[str, Any]) -> torch.Tensor:
    """(N, 1 or 3, h, w) in [0, 1] → the backbone's input format (3 channels, img_size², normalised)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    size = dc["img_size"]
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(dc["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(dc["std"]).view(1, 3, 1, 1)
    return (images - mean) / std


def _stack(datasets: list[Any], limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for ds in datasets:
        for i in range(min(len(ds), limit - len(xs))):
            x, y = ds[i][0], ds[i][1]
            xs.append(x)
            ys.append(int(y))
    return torch.stack(xs), torch.tensor(ys)


def upstream_data(up: dict, dc: dict[str, Any], seed: int) -> tuple[torch.Tensor, ...]:
    """(reference images, labels, query images, labels) in the backbone's input format."""
    dataset, n = up["dataset"], up["per_class"]
    if dataset == "glyphs":
        test = GlyphDataset("test", n, seed=up["seed"], img_size=dc["img_size"])
        qx, qy = test.as_tensors()
        if up["head"] == "checkpoint":  # the checkpoint's classifier needs no reference split: none rendered
            return _to_input(qx[:0], dc), qy[:0], _to_input(qx, dc), qy
        tx, ty = GlyphDataset("train", n, seed=up["seed"], img_size=dc["img_size"]).as_tensors()
        return _to_input(tx, dc), ty, _to_input(qx, dc), qy
    if dataset.startswith(IMAGEFOLDER):
        images, labels, _ = read_imagefolder(dataset[len(IMAGEFOLDER) :], max_per_class=2 * n, **dc)
        if up["head"] == "checkpoint":
            return images[:0], labels[:0], images, labels
        gen = torch.Generator().manual_seed(seed)
        ref = torch.zeros(len(labels), dtype=torch.bool)
        for c in labels.unique():
            idx = (labels == c).nonzero().flatten()
            ref[idx[torch.randperm(len(idx), generator=gen)[: max(1, len(idx) // 2)]]] = True
        return images[ref], labels[ref], images[~ref], labels[~ref]
    bench = build_scenario(dataset, n_experiences=1, seed=seed, **dc)  # one experience: every class
    n_classes = bench.n_classes
    tx, ty = _stack([e.dataset for e in bench.train_stream], n * n_classes)
    qx, qy = _stack([e.dataset for e in bench.test_stream], n * n_classes)
    return tx, ty, qx, qy


def checkpoint_classifier(bb: dict, checkpoint: str | Path) -> nn.Linear:
    """The classifier stored in a backbone checkpoint, as a frozen ``nn.Linear`` (sized from the file)."""
    state = read_state_dict(Path(checkpoint))
    weight = state.get("head.weight")
    if weight is None or weight.dim() != 2:
        raise ConfigError(
            f"upstream.head: checkpoint needs the checkpoint's classifier, but '{checkpoint}' has no head.weight; "
            "use upstream.head: knn"
        )
    model = create_backbone(bb["name"], checkpoint=checkpoint, num_classes=int(weight.shape[0]), **bb["kwargs"])
    return model.get_classifier()


def build_upstream(cfg: dict, model: nn.Module, checkpoint: str | Path | None) -> UpstreamRetentionPlugin | None:
    """The plugin measuring upstream accuracy before and after every experience, or None when not configured."""
    up = cfg.get("upstream") or {}
    if up.get("dataset") is None:
        return None
    dc = data_config(model.backbone)
    tx, ty, qx, qy = upstream_data(up, dc, cfg["seed"])
    if up["head"] == "checkpoint":
        classifier = checkpoint_classifier(cfg["backbone"], checkpoint)
        if int(qy.max()) + 1 != classifier.out_features:
            raise ConfigError(
                f"upstream.dataset '{up['dataset']}' has {int(qy.max()) + 1} classes but the checkpoint's classifier "
                f"has {classifier.out_features}; they must be the same classes in the same order (or use "
                "upstream.head: knn)"
            )
        probe = UpstreamProbe(qx, qy, mode="checkpoint", classifier=classifier)
    else:
        probe = UpstreamProbe(qx, qy, mode="knn", train_images=tx, train_labels=ty, k=up["k"])
    return UpstreamRetentionPlugin(probe)


def _check_imagefolder(folder: Path, limit: int, img_size: int) -> int:
    """The number of images :func:`read_imagefolder` would read; ConfigError for a folder it would refuse."""
    try:
        classes = class_folders(folder, "upstream image folder")
        if not classes:
            raise DataError(f"upstream image folder '{folder}' has no class sub-folders")
        total = 0
        for class_folder in classes:
            files = image_files(class_folder, "upstream class folder")[:limit]
            if not files:
                raise DataError(f"class folder '{class_folder}' has no images")
            for file in files:
                check_image(file, what="upstream image", short_side=img_size)
            total += len(files)
    except DataError as e:
        raise ConfigError(f"upstream.dataset: {e}") from None
    return total
