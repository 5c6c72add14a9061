"""Small in-memory datasets: images are resized and normalised once, up front, then split by class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
from torch.utils.data import TensorDataset

from ...errors import ConfigError
from .base import Common, check_split, class_order_for, experiences_for


def prepare_images(images: torch.Tensor, cfg: Common) -> torch.Tensor:
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


def tensor_dataset(x: torch.Tensor, y: np.ndarray | torch.Tensor) -> TensorDataset:
    # A 1-channel x becomes 3 channels as a stride-0 view (fancy indexing would materialise it, so
    # nothing indexes it before this point). The DataLoader's collate copies each batch anyway.
    x = x.expand(-1, 3, -1, -1)
    targets = torch.as_tensor(y, dtype=torch.long)
    dataset = TensorDataset(x, targets)
    dataset.targets = targets.tolist()  # Avalanche reads the labels from here without touching images
    return dataset


def stratified_split(y: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split; fixed random_state so every run/seed tests on the same images."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        train, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=0)
    except ValueError as exc:  # too few images per class for this fraction
        raise ConfigError(f"test_fraction={test_fraction} cannot split this dataset: {exc}") from None
    return np.sort(train), np.sort(test)


def in_memory_benchmark(
    cfg: Common,
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
        n_exp = experiences_for(cfg, n_classes, default_n_experiences)
    else:
        # A larger first experience: the base session of the B-N protocol (more to learn, more to forget).
        n_exp = default_n_experiences if cfg.n_experiences is None else cfg.n_experiences
        check_split(cfg.name, n_classes, n_exp, first_exp_classes)
        first = int(first_exp_classes)
        per_exp = {0: first}
    order = class_order_for(cfg, n_classes, class_order)
    # Split the small raw images, then resize each part: indexing the resized tensor would copy it.
    train_x = prepare_images(images[torch.as_tensor(train_idx)], cfg)
    test_x = prepare_images(images[torch.as_tensor(test_idx)], cfg)
    return nc_benchmark(
        tensor_dataset(train_x, labels[train_idx]),
        tensor_dataset(test_x, labels[test_idx]),
        n_experiences=n_exp,
        task_labels=cfg.task_labels,
        shuffle=False,
        fixed_class_order=order,
        per_exp_classes=per_exp or None,
    )
