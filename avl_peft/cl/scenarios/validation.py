"""A validation split carved from a class-incremental benchmark's training data, for choosing hyper-parameters.

:func:`carve_validation` takes a benchmark built by :func:`.base.build_scenario` and returns another one of
the same kind (Avalanche ``nc_benchmark``, same class order and classes per experience) whose training
stream holds what is left of each experience's training images and whose test stream holds the carved
ones. The test set of the original benchmark is never read, so choosing on this split cannot see it.

The split is stratified per class inside each experience (a class's images never leave its experience),
seeded by ``(seed, experience)`` and recorded (:class:`Carve`). ``experiences="first"`` keeps only the first
experience (selection on the first task, the protocol of Chaudhry et al. 2019, arXiv 1812.00420);
``"all"`` keeps them all, which uses data of experiences a continual learner would not have seen yet when
it starts (docs/design.md, "Validation-based selection", discusses the trade-off).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from avalanche.benchmarks import nc_benchmark

from ...errors import ConfigError

FIRST, ALL = "first", "all"


@dataclasses.dataclass(frozen=True)
class Carve:
    """Which training images went where: indices into the benchmark's ``original_train_dataset``."""

    fraction: float
    seed: int
    experiences: str
    train: tuple[tuple[int, ...], ...]  # per kept experience, the images the trial trains on
    validation: tuple[tuple[int, ...], ...]  # per kept experience, the images it is scored on

    def record(self) -> dict[str, Any]:
        """What results.json keeps: the settings and the sizes (the indices follow from the seed)."""
        return {
            "fraction": self.fraction,
            "seed": self.seed,
            "experiences": self.experiences,
            "train_images": [len(t) for t in self.train],
            "validation_images": [len(v) for v in self.validation],
        }


def split_indices(
    assignment: list[list[int]], targets: np.ndarray, *, fraction: float, seed: int, experiences: str
) -> Carve:
    """Per experience and class, a seeded ``fraction`` of the images (at least one, never all) to validation."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation.fraction must be in (0, 1), got {fraction!r}")
    if experiences not in (FIRST, ALL):
        raise ConfigError(f"validation.experiences must be '{FIRST}' or '{ALL}', got {experiences!r}")
    kept = assignment[:1] if experiences == FIRST else assignment
    train, validation = [], []
    for e, indices in enumerate(kept):
        indices = np.asarray(indices, dtype=np.int64)
        rng = np.random.default_rng([seed, e])
        to_train, to_val = [], []
        for c in np.unique(targets[indices]):
            members = rng.permutation(indices[targets[indices] == c])
            if members.size < 2:
                raise ConfigError(
                    f"validation: class {int(c)} of experience {e} has {members.size} training image; at least 2 "
                    "are needed to carve a validation split (drop search, or use a scenario with more images)"
                )
            n_val = min(members.size - 1, max(1, round(fraction * members.size)))
            to_val.append(members[:n_val])
            to_train.append(members[n_val:])
        train.append(tuple(int(i) for i in np.sort(np.concatenate(to_train))))
        validation.append(tuple(int(i) for i in np.sort(np.concatenate(to_val))))
    return Carve(fraction, seed, experiences, tuple(train), tuple(validation))


def carve_validation(benchmark: Any, *, fraction: float, seed: int, experiences: str) -> tuple[Any, Carve]:
    """(a benchmark training on the rest and testing on the carved images, the carve). See the module."""
    needed = ("original_train_dataset", "train_exps_patterns_assignment", "n_classes_per_exp", "classes_order")
    if not all(hasattr(benchmark, name) for name in needed):
        raise ConfigError(
            "search: validation-based selection needs a class-incremental scenario (built with Avalanche's "
            "nc_benchmark: digits, mnist5k, synthetic, split_cifar100, imagenet_r, five_datasets); this one is not"
        )
    original = benchmark.original_train_dataset
    targets = np.asarray([int(t) for t in original.targets], dtype=np.int64)
    assignment = [list(a) for a in benchmark.train_exps_patterns_assignment]
    carve = split_indices(assignment, targets, fraction=fraction, seed=seed, experiences=experiences)
    k = len(carve.train)
    per_exp = [int(n) for n in benchmark.n_classes_per_exp[:k]]
    order = [int(c) for c in benchmark.classes_order[: sum(per_exp)]]
    carved = nc_benchmark(
        original.subset([i for part in carve.train for i in part]).train(),
        original.subset([i for part in carve.validation for i in part]).eval(),
        n_experiences=k,
        task_labels=bool(getattr(benchmark, "_has_task_labels", False)),
        shuffle=False,
        fixed_class_order=order,
        per_exp_classes=dict(enumerate(per_exp)),
    )
    carved.classes_order = order
    carved.scenario_config = {**getattr(benchmark, "scenario_config", {}), "validation": carve.record()}
    return carved, carve
