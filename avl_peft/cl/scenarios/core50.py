"""CORe50 (Avalanche ``CORe50``), NC or NI protocol, downloaded on first use."""

from __future__ import annotations

import dataclasses

from avalanche.benchmarks.classic import CORe50

from ...errors import ConfigError
from ...options import knob
from .base import SCENARIOS, Built, Common, fetch, image_transform, takes

_CORE50_EXPERIENCES = {"nc": 9, "ni": 8}
PROTOCOLS = tuple(_CORE50_EXPERIENCES)


@dataclasses.dataclass(frozen=True)
class CORe50Options:
    protocol: str = knob("nc", "nc: new classes per experience; ni: new instances of every class", choices=PROTOCOLS)
    # CORe50 ships 10 fixed orders ("runs"); deriving the run from the seed makes seeds differ.
    run: int | None = knob(None, "which of the 10 fixed orders (null: seed % 10)", minimum=0, maximum=9)
    mini: bool = knob(False, "the 32x32 version")
    object_level: bool = knob(True, "50 objects as classes (false: 10 categories)")
    augment: bool = knob(True, "random horizontal flips of training images")


@SCENARIOS.register("core50", "CORe50 objects, NC (9 exps) or NI (8 exps) protocol (Avalanche CORe50); run = seed % 10")
@takes(CORe50Options)
def _core50(cfg: Common, o: CORe50Options) -> Built:
    from avalanche.benchmarks.datasets.core50 import core50_data

    protocol, mini, object_level, augment = o.protocol, o.mini, o.object_level, o.augment
    run = cfg.seed % 10 if o.run is None else o.run
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
    benchmark = fetch(
        "CORe50",
        folder,
        how_to,
        lambda: CORe50(
            scenario=protocol,
            run=run,
            object_lvl=object_level,
            mini=mini,
            train_transform=image_transform(cfg, flip=augment),
            eval_transform=image_transform(cfg),
            dataset_root=folder,
        ),
    )
    if not hasattr(benchmark, "classes_order"):  # NI: every experience has every class
        benchmark.classes_order = list(range(benchmark.n_classes))
    return benchmark, {"run": run}


# --------------------------------------------------------------------------------------------------
# Five datasets: CIFAR-10, MNIST, Fashion-MNIST, SVHN, notMNIST, one per experience
# --------------------------------------------------------------------------------------------------
