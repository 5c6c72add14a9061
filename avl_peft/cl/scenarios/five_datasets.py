"""5-datasets: CIFAR-10, MNIST, Fashion-MNIST, SVHN (torchvision downloads) and notMNIST (a local folder),
one dataset per experience, 10 classes each (experience k owns classes 10k..10k+9)."""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from avalanche.benchmarks import nc_benchmark
from PIL import Image
from torch.utils.data import Dataset

# Referenced through this module (not torchvision.datasets.X) so that tests can swap in tiny fakes.
from torchvision.datasets import CIFAR10, MNIST, SVHN, FashionMNIST

from ...errors import ConfigError, DataError
from ...options import knob
from ...safeio.images import class_folders, image_files, open_image
from .base import SCENARIOS, Built, Common, fetch, image_transform, takes

# notMNIST letters are 28x28: 128x128 leaves room for a rescaled copy, and bounds the memory of the whole set
# (every image is kept decoded) at 16 KB per file.
NOTMNIST_MAX_PIXELS = 128 * 128

_NOTMNIST_URL = "http://yaroslavvb.com/upload/notMNIST/"

_FIVE = ("cifar10", "mnist", "fashion_mnist", "svhn", "notmnist")


class _OffsetConcat(Dataset):
    """Concatenation of (dataset, labels, offset) parts with labels shifted by each part's offset.

    The labels are read from the datasets' label arrays up front, so building the benchmark never
    decodes an image.
    """

    def __init__(self, parts: Sequence[tuple[Dataset, Sequence[int], int]]):
        self.parts = [p[0] for p in parts]
        self.targets: list[int] = []
        self.ends: list[int] = []
        for _, labels, offset in parts:
            self.targets.extend(int(t) + offset for t in labels)
            self.ends.append(len(self.targets))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        part = bisect.bisect_right(self.ends, index)
        start = self.ends[part - 1] if part else 0
        img = self.parts[part][index - start][0]
        return img, self.targets[index]


class _PILImages(Dataset):
    """Decoded grey images kept in memory, returned as PIL images like torchvision's datasets."""

    def __init__(self, arrays: list[np.ndarray], targets: list[int]):
        self.arrays, self.targets = arrays, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.arrays[index]), self.targets[index]  # 2-D uint8 -> mode "L"


def _labels_of(dataset: Any) -> list[int]:
    for attr in ("targets", "labels"):  # torchvision: .targets, except SVHN: .labels
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return [int(t) for t in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    return [int(dataset[i][1]) for i in range(len(dataset))]


# key -> (label for messages, how to get it by hand).
_TORCHVISION_SETS = {
    "cifar10": (
        "CIFAR-10",
        "Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there "
        "(giving cifar-10-batches-py/).",
    ),
    "mnist": (
        "MNIST",
        "Put the four *-ubyte.gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ into <folder>/MNIST/raw/.",
    ),
    "fashion_mnist": (
        "Fashion-MNIST",
        "Put the four *-ubyte.gz files from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ "
        "into <folder>/FashionMNIST/raw/.",
    ),
    "svhn": (
        "SVHN",
        "Put train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ there.",
    ),
}


def _torchvision_pair(key: str, folder: Path) -> tuple[Any, Any]:
    """Train and test sets of one of the four torchvision datasets (downloaded into ``folder``)."""
    label, how_to = _TORCHVISION_SETS[key]
    # Resolved at call time from this module's names, so tests can monkeypatch them.
    cls = {"cifar10": CIFAR10, "mnist": MNIST, "fashion_mnist": FashionMNIST, "svhn": SVHN}[key]
    root = str(folder)

    def load() -> tuple[Any, Any]:
        if key == "svhn":  # SVHN alone takes split= instead of train=
            return cls(root=root, split="train", download=True), cls(root=root, split="test", download=True)
        return cls(root=root, train=True, download=True), cls(root=root, train=False, download=True)

    return fetch(label, folder, how_to.replace("<folder>", root), load)


def _notmnist_files(folder: Path, test_fraction: float) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(path, label) lists for train and test.

    Accepts ``<folder>/train/<A..J>/`` + ``<folder>/test/<A..J>/``, or the unsplit ``<folder>/<A..J>/``
    of the extracted notMNIST_small archive, which is then split per class, deterministically.
    """
    how_to = (
        f"Get notMNIST_small.tar.gz from {_NOTMNIST_URL}, extract it and arrange its 10 letter folders "
        f"A..J as '{folder}/train/<letter>/*.png' and '{folder}/test/<letter>/*.png' (or put the 10 "
        f"folders directly in '{folder}' to have them split {1 - test_fraction:.0%}/{test_fraction:.0%}); "
        "or set the `root:` option to the folder that holds notMNIST/."
    )
    if not folder.is_dir():
        raise DataError(f"notMNIST folder '{folder}' does not exist. {how_to}")

    def images(d: Path) -> list[Path]:
        found = image_files(d, "notMNIST class folder")
        if not found:
            raise DataError(f"notMNIST class folder '{d}' holds no images (.png/.jpg). {how_to}")
        return found

    def check_ten(d: Path) -> list[Path]:
        dirs = class_folders(d, "notMNIST folder")
        if len(dirs) != 10:
            raise DataError(
                f"notMNIST folder '{d}' must hold 10 class sub-folders (A..J), found {len(dirs)}"
                f"{': ' + ', '.join(p.name for p in dirs) if dirs else ''}. {how_to}"
            )
        return dirs

    if (folder / "train").is_dir() or (folder / "test").is_dir():
        splits = []
        for split in ("train", "test"):
            if not (folder / split).is_dir():
                raise DataError(f"notMNIST folder '{folder / split}' is missing. {how_to}")
            splits.append(check_ten(folder / split))
        train_dirs, test_dirs = splits
        if [p.name for p in train_dirs] != [p.name for p in test_dirs]:
            raise DataError(f"notMNIST train/ and test/ in '{folder}' must have the same class folders. {how_to}")
        train = [(f, c) for c, d in enumerate(train_dirs) for f in images(d)]
        test = [(f, c) for c, d in enumerate(test_dirs) for f in images(d)]
        return train, test

    train, test = [], []
    rng = np.random.default_rng(0)  # fixed: the split must not change with the class-order seed
    for c, d in enumerate(check_ten(folder)):
        files = images(d)
        if len(files) < 2:
            raise DataError(f"notMNIST class folder '{d}' needs at least 2 images to split into train and test")
        picked = rng.permutation(len(files))
        n_test = min(max(1, round(len(files) * test_fraction)), len(files) - 1)
        test += [(files[i], c) for i in sorted(picked[:n_test])]
        train += [(files[i], c) for i in sorted(picked[n_test:])]
    return train, test


def _read_grey(files: list[tuple[Path, int]]) -> _PILImages:
    """Decode every image now, so a bad file (notMNIST_small has two) fails here, named, not mid-training."""
    arrays, targets = [], []
    for path, label in files:
        # A notMNIST letter is 28x28; anything much larger is a wrong file or a bomb, and every image is kept
        # decoded, so the per-image budget (times the file count) bounds the memory of the whole set.
        img = open_image(
            path,
            "L",
            what="notMNIST image",
            max_pixels=NOTMNIST_MAX_PIXELS,
            fix="notMNIST letters are 28x28, so delete or replace the file",
        )
        arrays.append(np.asarray(img, dtype=np.uint8).copy())
        targets.append(label)
    return _PILImages(arrays, targets)


def _dataset_order(cfg: Common, order: Any) -> list[str]:
    if order == "fixed":
        return list(_FIVE)
    if order == "seeded":
        return [_FIVE[i] for i in np.random.default_rng(cfg.seed).permutation(len(_FIVE))]
    return [str(o) for o in order]


@dataclasses.dataclass(frozen=True)
class FiveDatasetsOptions:
    order: Any = "fixed"  # 'fixed', 'seeded' or a list of the 5 names: a union no knob types, checked below
    notmnist_test_fraction: float = knob(
        0.2, "share of each notMNIST letter held out for testing", minimum=0.01, maximum=0.99
    )

    def __post_init__(self) -> None:
        order = self.order
        names = isinstance(order, (list, tuple)) and all(isinstance(o, str) for o in order)
        if order not in ("fixed", "seeded") and not (names and sorted(order) == sorted(_FIVE)):
            raise ConfigError(
                f"scenario 'five_datasets'.order: must be 'fixed' ({', '.join(_FIVE)}), 'seeded' (shuffled by "
                f"seed) or a list of those 5 names, got {order!r}"
            )


@SCENARIOS.register("five_datasets", "CIFAR-10, MNIST, Fashion-MNIST, SVHN, notMNIST: one dataset per exp, 50 classes")
@takes(FiveDatasetsOptions)
def _five_datasets(cfg: Common, o: FiveDatasetsOptions) -> Built:
    names = _dataset_order(cfg, o.order)
    test_fraction = o.notmnist_test_fraction
    if cfg.n_experiences not in (None, 5):
        raise ConfigError(
            f"five_datasets has exactly 5 experiences (one per dataset); n_experiences must be 5 or unset, "
            f"got {cfg.n_experiences}"
        )

    # Sub-folders named like Avalanche's defaults, so its earlier downloads are found.
    folders = {
        "cifar10": cfg.folder("cifar10"),
        "mnist": cfg.folder("mnist"),
        "fashion_mnist": cfg.folder("fashionmnist"),
        "svhn": cfg.folder("svhn"),
        "notmnist": cfg.folder("notMNIST"),
    }
    train_parts, test_parts = [], []
    for k, key in enumerate(names):
        if key == "notmnist":
            train_files, test_files = _notmnist_files(folders[key], test_fraction)
            train, test = _read_grey(train_files), _read_grey(test_files)
        else:
            train, test = _torchvision_pair(key, folders[key])
        train_labels, test_labels = _labels_of(train), _labels_of(test)
        found = sorted(set(train_labels) | set(test_labels))
        if found != list(range(10)):
            raise DataError(f"{key} in '{folders[key]}' should have the 10 classes 0..9, found {found}")
        # Experience k owns classes 10k..10k+9, whatever the dataset order.
        train_parts.append((train, train_labels, 10 * k))
        test_parts.append((test, test_labels, 10 * k))

    transform = image_transform(cfg)  # no flip: digits and letters are not mirror-symmetric
    benchmark = nc_benchmark(
        _OffsetConcat(train_parts),
        _OffsetConcat(test_parts),
        n_experiences=5,
        task_labels=cfg.task_labels,
        shuffle=False,
        fixed_class_order=list(range(50)),
        train_transform=transform,
        eval_transform=transform,
    )
    benchmark.dataset_order = names
    return benchmark, {"order": names}
