"""The upstream set of a run (``upstream.dataset``): reference and query images in the backbone's input format.

``dataset`` is a registered scenario (all its classes in one experience, its own train/test split; a
scenario that renders its images, like ``glyphs``, says in :data:`.base.UPSTREAM_OPTIONS` how to render
``per_class`` images per class from the upstream seed) or ``imagefolder:<path>``: ``<path>/<class>/<image>``
read by :class:`avl_peft.safeio.images.ImageFolder`, classes in sorted folder order, each class' first
``2 * per_class`` files split in half (seeded) into the reference and the query set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ...errors import ConfigError, DataError
from ...safeio.images import ImageFolder, check_image
from ...validate import check_int
from .base import CLASS_COUNTS, SCENARIOS, UPSTREAM_OPTIONS, build_scenario, parse_scenario_options

IMAGEFOLDER = "imagefolder:"


def read_imagefolder(
    path: str | Path,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels: int = 3,
    max_per_class: int | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """``(images, labels, class_names)`` of ``<path>/<class>/<image>`` (at most ``max_per_class`` a class).

    Each image is converted to RGB (``channels=3``) or greyscale (``1``), its shorter side resized to
    ``img_size`` (bilinear, antialiased), centre-cropped to ``img_size``², scaled to [0, 1] and normalised:
    ``images`` is (N, channels, img_size, img_size) float32, ``labels`` (N,) int64.
    """
    img_size = check_int("img_size", img_size, minimum=1)
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
        raise ConfigError(
            f"mean and std need {channels} values each (std > 0), got mean={mean} std={std}; use the backbone's "
            "data config"
        )
    if max_per_class is not None:
        max_per_class = check_int("max_per_class", max_per_class, minimum=1)
    transform = transforms.Compose(
        [
            transforms.Resize(img_size, interpolation=InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    root = Path(path).expanduser()
    folder = ImageFolder(
        root, transform, what="upstream image folder", mode="RGB" if channels == 3 else "L", short_side=img_size
    )
    taken = _first_per_class(folder.targets, max_per_class)
    items = [folder[i] for i in taken]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64), folder.classes


def _first_per_class(targets: Sequence[int], limit: int | None) -> list[int]:
    seen: dict[int, int] = {}
    taken = []
    for i, y in enumerate(targets):
        if limit is None or seen.get(y, 0) < limit:
            seen[y] = seen.get(y, 0) + 1
            taken.append(i)
    return taken


def _stack(datasets: list[Any], limit: int) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for ds in datasets:
        for i in range(min(len(ds), limit - len(xs))):
            x, y = ds[i][0], ds[i][1]
            xs.append(x)
            ys.append(int(y))
    return torch.stack(xs), torch.tensor(ys)


def upstream_sets(
    dataset: str,
    *,
    per_class: int,
    seed: int,
    data_seed: int,
    reference: bool,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(reference images, labels, query images, labels); the reference set is empty unless ``reference``.

    ``seed`` is the run's (class order, the image folder's split), ``data_seed`` the upstream data's own.
    """
    dc = {"img_size": img_size, "mean": mean, "std": std}
    if dataset.startswith(IMAGEFOLDER):
        images, labels, _ = read_imagefolder(dataset[len(IMAGEFOLDER) :], max_per_class=2 * per_class, **dc)
        if not reference:
            return images[:0], labels[:0], images, labels
        gen = torch.Generator().manual_seed(seed)
        ref = torch.zeros(len(labels), dtype=torch.bool)
        for c in labels.unique():
            idx = (labels == c).nonzero().flatten()
            ref[idx[torch.randperm(len(idx), generator=gen)[: max(1, len(idx) // 2)]]] = True
        return images[ref], labels[ref], images[~ref], labels[~ref]
    options = UPSTREAM_OPTIONS[dataset](per_class, data_seed) if dataset in UPSTREAM_OPTIONS else {}
    bench = build_scenario(dataset, n_experiences=1, seed=seed, **dc, **options)  # one experience: every class
    limit = per_class * bench.n_classes
    qx, qy = _stack([e.dataset for e in bench.test_stream], limit)
    if not reference:
        return qx[:0], qy[:0], qx, qy
    tx, ty = _stack([e.dataset for e in bench.train_stream], limit)
    return tx, ty, qx, qy


def upstream_images(dataset: str, per_class: int, reference: bool, img_size: int) -> int:
    """How many images :func:`upstream_sets` would hold, checked without decoding anything: from a scenario's
    class count, or by reading the header of every file an image folder would give."""
    if dataset.startswith(IMAGEFOLDER):
        folder = Path(dataset[len(IMAGEFOLDER) :]).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"upstream.dataset: image folder '{folder}' does not exist (expected <path>/<class>/*.png)"
            )
        try:
            files = ImageFolder(folder, what="upstream image folder")
            taken = _first_per_class(files.targets, 2 * per_class)
            for i in taken:
                check_image(files.samples[i][0], what="upstream image", short_side=img_size)
        except DataError as e:
            raise ConfigError(f"upstream.dataset: {e}") from None
        return len(taken)
    if dataset not in SCENARIOS:
        raise ConfigError(
            f"upstream.dataset: unknown dataset '{dataset}'; use a scenario ({', '.join(SCENARIOS.names())}) "
            "or imagefolder:<path>"
        )
    n_classes = (
        CLASS_COUNTS[dataset][0](parse_scenario_options(dataset, {}), img_size) if dataset in CLASS_COUNTS else 0
    )
    return n_classes * per_class * (2 if reference else 1)
