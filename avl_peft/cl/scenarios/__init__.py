"""Continual-learning benchmarks by name: ``build_scenario("digits", n_experiences=5, seed=0, ...)``.

``build_scenario`` returns an Avalanche 0.6.0 benchmark whose train/test streams yield ``(x, y, task)``
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

# One module per dataset family; importing them fills the registry.
from . import cifar, core50, five_datasets, imagenet_r, offline  # noqa: F401
from .base import SCENARIOS, build_scenario, check_counts, parse_scenario_options

__all__ = ["SCENARIOS", "build_scenario", "check_counts", "parse_scenario_options"]
