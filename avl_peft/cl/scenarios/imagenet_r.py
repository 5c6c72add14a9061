"""ImageNet-R (Hendrycks et al. 2021): 200 ImageNet classes as renditions (art, cartoons, sketches, …),
the second standard benchmark of pretrained-ViT continual learning (L2P, CODA-Prompt, InfLoRA, SD-LoRA,
RanPAC report it).

Layout: the official release ``imagenet-r.tar`` extracted under ``<root>/imagenet-r/<wnid>/*.jpg`` (200
class folders). There is no official train/test split; the usual one is a per-class 80/20 split, seeded
(``split_seed``, independent of the run seed so every run tests on the same images). Classes are the
folders in sorted order; the class order across experiences is drawn from the run seed like every other
scenario. Images are read lazily (30,000 of them) with the run's transform; an unreadable or oversized
image fails with a DataError naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from avalanche.benchmarks import nc_benchmark
from PIL import Image
from torch.utils.data import Dataset

from ...errors import DataError
from ...safeio.images import class_folders as _class_folders
from ...safeio.images import image_files, open_image
from ...validate import check_bool, check_int, check_number
from .base import CLASS_COUNTS, SCENARIOS, Built, Common, class_order_for, experiences_for, image_transform

N_CLASSES = 200
URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


class ImageFiles(Dataset):
    """(path, label) pairs decoded on access; ``targets`` for Avalanche without opening any image."""

    def __init__(self, files: Sequence[tuple[Path, int]]):
        self.files = list(files)
        self.targets = [label for _, label in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.files[index]
        return open_image(path, "RGB", what="ImageNet-R image"), label


def class_folders(folder: Path) -> list[Path]:
    """The class folders of an ImageNet-R release, checked: the folder exists and holds 200 classes."""
    if not folder.is_dir():
        raise DataError(
            f"ImageNet-R is not in '{folder}'. It cannot be downloaded automatically: get {URL}, extract it so "
            f"that '{folder}/<wnid>/*.jpg' exists, or set `root:` to the folder holding 'imagenet-r/'."
        )
    classes = _class_folders(folder, "ImageNet-R folder")
    if len(classes) != N_CLASSES:
        raise DataError(
            f"'{folder}' has {len(classes)} class folders; the ImageNet-R release has {N_CLASSES}. Is the archive "
            "fully extracted, and does `root:` point at the folder that holds 'imagenet-r/'?"
        )
    return classes


def split_files(classes: list[Path], test_fraction: float, seed: int) -> tuple[list, list]:
    """Per-class seeded split of each class folder's images into (train, test) (path, label) lists."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, folder in enumerate(classes):
        files = image_files(folder, "ImageNet-R class folder")
        if len(files) < 2:
            raise DataError(f"ImageNet-R class folder '{folder}' has {len(files)} image(s); it needs at least 2")
        order = rng.permutation(len(files))
        n_test = min(len(files) - 1, max(1, round(test_fraction * len(files))))
        test += [(files[i], label) for i in sorted(order[:n_test])]
        train += [(files[i], label) for i in sorted(order[n_test:])]
    return train, test


@SCENARIOS.register("imagenet_r", "ImageNet-R, 200 classes, local folder <root>/imagenet-r, 80/20 split; 10 exps")
def _imagenet_r(
    cfg: Common,
    *,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    augment: bool = True,
    class_order: Sequence[int] | None = None,
) -> Built:
    test_fraction = check_number("test_fraction", test_fraction, low=0.01, high=0.99)
    split_seed = check_int("split_seed", split_seed, minimum=0)
    augment = check_bool("augment", augment)
    n_exp = experiences_for(cfg, N_CLASSES, 10)
    order = class_order_for(cfg, N_CLASSES, class_order)
    train, test = split_files(class_folders(cfg.folder("imagenet-r")), test_fraction, split_seed)
    benchmark = nc_benchmark(
        ImageFiles(train),
        ImageFiles(test),
        n_experiences=n_exp,
        task_labels=cfg.task_labels,
        shuffle=False,
        fixed_class_order=order,
        train_transform=image_transform(cfg, flip=augment),
        eval_transform=image_transform(cfg),
    )
    derived: dict[str, Any] = {"n_train": len(train), "n_test": len(test)}
    return benchmark, derived


CLASS_COUNTS["imagenet_r"] = (lambda options, img_size: N_CLASSES, 10)
