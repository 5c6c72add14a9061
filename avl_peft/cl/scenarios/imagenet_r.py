"""ImageNet-R (Hendrycks et al. 2021): 200 ImageNet classes as renditions (art, cartoons, sketches, …),
the second standard benchmark of pretrained-ViT continual learning (L2P, CODA-Prompt, InfLoRA, SD-LoRA,
RanPAC report it).

Layout: the official release ``imagenet-r.tar`` extracted under ``<root>/imagenet-r/<wnid>/*.jpg`` (200
class folders). There is no official train/test split; the usual one is a per-class 80/20 split, seeded
(``split_seed``, independent of the run seed so every run tests on the same images). Classes are the
folders in sorted order; the class order across experiences is drawn from the run seed like every other
scenario. Images are read lazily (30,000 of them, :class:`avl_peft.safeio.images.ImageFolder`) with the run's
transform; an unreadable or oversized image fails with a DataError naming the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from avalanche.benchmarks import nc_benchmark
from PIL import Image
from torch.utils.data import Dataset

from ...errors import DataError
from ...options import knob
from ...safeio.images import ImageFolder, class_folders
from .base import CLASS_COUNTS, SCENARIOS, Built, Common, class_order_for, experiences_for, image_transform, takes

N_CLASSES = 200
URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


class ImageFiles(Dataset):
    """Some images of an :class:`ImageFolder`, decoded on access; ``targets`` for Avalanche without opening any."""

    def __init__(self, folder: ImageFolder, indices: Sequence[int]):
        self.folder, self.indices = folder, list(indices)
        self.targets = [folder.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.folder[self.indices[index]]


def read_folder(folder: Path) -> ImageFolder:
    """The ImageNet-R release, checked: the folder exists and holds 200 classes, each with images."""
    if not folder.is_dir():
        raise DataError(
            f"ImageNet-R is not in '{folder}'. It cannot be downloaded automatically: get {URL}, extract it so "
            f"that '{folder}/<wnid>/*.jpg' exists, or set `root:` to the folder holding 'imagenet-r/'."
        )
    classes = class_folders(folder, "ImageNet-R folder")  # counted before every class folder is listed
    if len(classes) != N_CLASSES:
        raise DataError(
            f"'{folder}' has {len(classes)} class folders; the ImageNet-R release has {N_CLASSES}. Is the archive "
            "fully extracted, and does `root:` point at the folder that holds 'imagenet-r/'?"
        )
    return ImageFolder(folder, what="ImageNet-R")


def split_files(folder: ImageFolder, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per-class seeded split of the folder's images into (train, test) sample indices."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(folder.targets):
        by_class.setdefault(label, []).append(i)
    train, test = [], []
    for label, files in sorted(by_class.items()):
        if len(files) < 2:
            where = Path(folder.root) / folder.classes[label]
            raise DataError(f"ImageNet-R class folder '{where}' has {len(files)} image(s); it needs at least 2")
        order = rng.permutation(len(files))
        n_test = min(len(files) - 1, max(1, round(test_fraction * len(files))))
        test += [files[i] for i in sorted(order[:n_test])]
        train += [files[i] for i in sorted(order[n_test:])]
    return train, test


@dataclasses.dataclass(frozen=True)
class ImageNetROptions:
    test_fraction: float = knob(0.2, "share of each class held out for testing", minimum=0.01, maximum=0.99)
    split_seed: int = knob(0, "seed of the train/test split (fixed across runs)", minimum=0)
    augment: bool = knob(True, "random horizontal flips of training images")
    class_order: Sequence[int] | None = None  # class ids in arrival order (null: seeded); class_order_for checks it


@SCENARIOS.register("imagenet_r", "ImageNet-R, 200 classes, local folder <root>/imagenet-r, 80/20 split; 10 exps")
@takes(ImageNetROptions)
def _imagenet_r(cfg: Common, o: ImageNetROptions) -> Built:
    test_fraction, split_seed, augment, class_order = o.test_fraction, o.split_seed, o.augment, o.class_order
    n_exp = experiences_for(cfg, N_CLASSES, 10)
    order = class_order_for(cfg, N_CLASSES, class_order)
    folder = read_folder(cfg.folder("imagenet-r"))
    train, test = split_files(folder, test_fraction, split_seed)
    benchmark = nc_benchmark(
        ImageFiles(folder, train),
        ImageFiles(folder, test),
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
