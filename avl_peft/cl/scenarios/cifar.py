"""Split CIFAR-100 (Avalanche ``SplitCIFAR100``), downloaded on first use."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from avalanche.benchmarks.classic import SplitCIFAR100

from ...options import knob
from .base import (
    CLASS_COUNTS,
    SCENARIOS,
    Built,
    Common,
    class_order_for,
    experiences_for,
    fetch,
    image_transform,
    takes,
)


@dataclasses.dataclass(frozen=True)
class CIFAROptions:
    augment: bool = knob(True, "random horizontal flips of training images")
    class_order: Sequence[int] | None = None  # class ids in arrival order (null: seeded); class_order_for checks it


@SCENARIOS.register("split_cifar100", "CIFAR-100 split into equal class groups (Avalanche SplitCIFAR100); 10 exps")
@takes(CIFAROptions)
def _split_cifar100(cfg: Common, o: CIFAROptions) -> Built:
    augment, class_order = o.augment, o.class_order
    n_exp = experiences_for(cfg, 100, 10)
    order = class_order_for(cfg, 100, class_order)
    folder = cfg.folder("cifar100")
    how_to = (
        "Download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it so that "
        f"'{folder / 'cifar-100-python'}' exists."
    )
    return fetch(
        "CIFAR-100",
        folder,
        how_to,
        lambda: SplitCIFAR100(
            n_experiences=n_exp,
            return_task_id=cfg.task_labels,
            fixed_class_order=order,
            train_transform=image_transform(cfg, flip=augment),
            eval_transform=image_transform(cfg),
            dataset_root=folder,
        ),
    )


CLASS_COUNTS["split_cifar100"] = (lambda options, img_size: 100, 10)
