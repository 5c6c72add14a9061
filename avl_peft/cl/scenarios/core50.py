"""CORe50 (Avalanche ``CORe50``), NC or NI protocol, downloaded on first use."""

from __future__ import annotations

from avalanche.benchmarks.classic import CORe50

from ...errors import ConfigError
from ...validate import check_bool, check_choice, check_int
from .base import SCENARIOS, Built, Common, fetch, image_transform

_CORE50_EXPERIENCES = {"nc": 9, "ni": 8}


@SCENARIOS.register("core50", "CORe50 objects, NC (9 exps) or NI (8 exps) protocol (Avalanche CORe50); run = seed % 10")
def _core50(
    cfg: Common,
    *,
    protocol: str = "nc",
    run: int | None = None,
    mini: bool = False,
    object_level: bool = True,
    augment: bool = True,
) -> Built:
    from avalanche.benchmarks.datasets.core50 import core50_data

    protocol = check_choice("protocol", protocol, sorted(_CORE50_EXPERIENCES))
    # CORe50 ships 10 fixed orders ("runs"); deriving the run from the seed makes seeds differ.
    run = cfg.seed % 10 if run is None else check_int("run", run, minimum=0, maximum=9)
    mini = check_bool("mini", mini)
    object_level = check_bool("object_level", object_level)
    augment = check_bool("augment", augment)
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
