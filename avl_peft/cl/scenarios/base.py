"""What every scenario shares: the registry, the common arguments, class orders, fetching, transforms.

A builder is registered with ``@SCENARIOS.register(name, description)`` over ``@takes(Options)``, where
``Options`` is a dataclass of :func:`~avl_peft.options.knob` fields like a method's or a strategy's; it is
called with a :class:`Common` and its parsed ``Options`` (:func:`parse_scenario_options`) and returns
``(benchmark, derived)`` where ``derived`` holds option values it resolved itself (e.g. CORe50's run).
"""

from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from avalanche.benchmarks.datasets import default_dataset_location
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
from PIL import Image
from torchvision import transforms

from ...errors import ConfigError, DataError
from ...options import as_dict, knob, parse_options
from ...registry import Registry
from ...validate import check_bool, check_int

Built = tuple[CLScenario, dict[str, Any]]
SCENARIOS: Registry[Callable[..., Built]] = Registry("scenario")
F = TypeVar("F", bound=Callable[..., Built])


def takes(options: type) -> Callable[[F], F]:
    """Declare the ``Options`` dataclass a scenario builder takes (put it under ``@SCENARIOS.register``)."""

    def deco(builder: F) -> F:
        builder.Options = options  # type: ignore[attr-defined]
        return builder

    return deco


def first_exp_classes_knob() -> Any:
    return knob(None, "classes of the first experience, the rest split evenly (null: all equal)", minimum=1)


# Exceptions that mean "the data could not be read or fetched" (no network, corrupt archive, ...).
# URLError, socket errors and timeouts are OSErrors; torchvision raises RuntimeError for bad checksums.
FETCH_ERRORS = (
    OSError,
    RuntimeError,
    EOFError,
    tarfile.TarError,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)


class Common:
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
            n_experiences = check_int("n_experiences", n_experiences, minimum=1)
        self.n_experiences = n_experiences
        self.seed = check_int("seed", seed)
        self.img_size = check_int("img_size", img_size, minimum=1)
        self.mean = _triple("mean", mean)
        self.std = _triple("std", std)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive per channel, got {list(self.std)}")
        self.root = None if root is None else Path(root).expanduser().resolve()
        self.task_labels = check_bool("task_labels", task_labels)

    def folder(self, dataset: str) -> Path:
        """Where ``dataset`` lives: ``<root>/<dataset>``, or Avalanche's default location for it."""
        if self.root is None:
            return Path(default_dataset_location(dataset)).expanduser()
        return self.root / dataset

    def normalize(self) -> transforms.Normalize:
        return transforms.Normalize(self.mean, self.std)


def _triple(key: str, value: Any) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a list of 3 numbers (one per RGB channel), got {value!r}") from None
    if len(out) != 3:
        raise ConfigError(f"{key} must have 3 values (one per RGB channel), got {len(out)}: {list(out)}")
    return out  # type: ignore[return-value]


def class_order_for(cfg: Common, n_classes: int, class_order: Sequence[int] | None) -> list[int]:
    """The given order (checked to be a permutation of 0..n_classes-1) or a seeded shuffle."""
    if class_order is None:
        return [int(c) for c in np.random.default_rng(cfg.seed).permutation(n_classes)]
    try:
        order = [check_int("class_order entry", c) for c in class_order]
    except TypeError:
        raise ConfigError(f"class_order must be a list of class ids, got {class_order!r}") from None
    if sorted(order) != list(range(n_classes)):
        raise ConfigError(
            f"class_order must list every class id 0..{n_classes - 1} of '{cfg.name}' exactly once, got {order}"
        )
    return order


def experiences_for(cfg: Common, n_classes: int, default: int) -> int:
    n = default if cfg.n_experiences is None else cfg.n_experiences
    check_split(cfg.name, n_classes, n)
    return n


def check_split(name: str, n_classes: int, n: int, first: int | None = None) -> None:
    """ConfigError unless ``n`` experiences split ``n_classes`` evenly (after a first one of ``first`` classes)."""
    if first is None:
        if n_classes % n:
            divisors = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
            raise ConfigError(
                f"n_experiences={n} does not divide the {n_classes} classes of '{name}' evenly; "
                f"allowed: {', '.join(map(str, divisors))}"
            )
        return
    first = check_int("first_exp_classes", first, minimum=1, maximum=n_classes - 1)
    rest = n_classes - first
    if n < 2 or rest % (n - 1):
        raise ConfigError(
            f"first_exp_classes={first} leaves {rest} classes of '{name}', which n_experiences={n} "
            f"cannot split evenly over the {n - 1} later experiences; choose n_experiences - 1 dividing {rest}"
        )


# What a dry-run can check of a scenario without building or downloading it: its number of classes from its
# options and the image side (the function also checks counts the builder would refuse), and its default
# number of experiences. Scenarios whose classes are only known from their data are not listed.
CLASS_COUNTS: dict[str, tuple[Callable[[dict[str, Any], int], int], int]] = {}

# Scenarios that render their images (glyphs): the options that give ``per_class`` images per class of each
# split, drawn from the upstream seed, when the scenario is a run's upstream set (:mod:`.upstream`).
UPSTREAM_OPTIONS: dict[str, Callable[[int, int], dict[str, Any]]] = {}


def check_counts(name: str, n_experiences: int | None, options: Any, img_size: int) -> None:
    """The dry-run's check of a scenario's counts: sizes within bounds and experiences splitting the classes.

    ``options`` are the parsed ones (:func:`parse_scenario_options`)."""
    if name not in CLASS_COUNTS:
        return
    count, default = CLASS_COUNTS[name]
    n_classes = count(options, img_size)
    try:
        check_split(
            name,
            n_classes,
            default if n_experiences is None else n_experiences,
            getattr(options, "first_exp_classes", None),
        )
    except ConfigError as e:
        raise ConfigError(f"scenario: {e}") from None


def parse_scenario_options(name: str, options: Any, *, where: str = "scenario.options") -> Any:
    """Scenario ``name``'s ``Options``, parsed from ``options`` (names, types and bounds checked, with
    did-you-mean) before anything is built or downloaded: the one check a config and a builder share.

    The arguments every scenario shares (``seed``, ``img_size``, ...) are not options: the run sets them.
    """
    cls = SCENARIOS.get(name).Options  # type: ignore[attr-defined]
    if isinstance(options, dict):
        for key in options:
            if key in _COMMON_ARGUMENTS:
                raise ConfigError(
                    f"{where}: '{key}' is not a scenario option; a run sets it from {_COMMON_ARGUMENTS[key]}"
                )
    return parse_options(cls, f"scenario '{name}'", options)


# Arguments of build_scenario that every scenario shares, and where a run takes them from.
_COMMON_ARGUMENTS = {
    "n_experiences": "scenario.n_experiences",
    "seed": "the top-level seed",
    "img_size": "the backbone's data config (backbone.kwargs.img_size)",
    "mean": "the backbone's data config",
    "std": "the backbone's data config",
    "root": "scenario.root",
    "task_labels": "training.head (multi: task labels)",
}


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
    cfg = Common(name, n_experiences, seed, img_size, mean, std, root, task_labels)
    parsed = parse_scenario_options(name, options)

    benchmark, derived = builder(cfg, parsed)

    # Callers record the order in their results; NCScenario may hold numpy ints or tuples.
    benchmark.classes_order = [int(c) for c in benchmark.classes_order]
    resolved = as_dict(parsed)
    resolved.update(derived)  # values the builder resolved itself, e.g. CORe50's run
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


def fetch(label: str, folder: Path, how_to: str, load: Callable[[], Any]) -> Any:
    """Run ``load`` and turn a failed download/read into a DataError that says what to do."""
    try:
        return load()
    except DataError:
        raise
    except FETCH_ERRORS as exc:
        # `from None`: the user needs the folder and the fix, not urllib's traceback; the cause is quoted.
        raise DataError(
            f"{label} is not available in '{folder}' and could not be downloaded there "
            f"({type(exc).__name__}: {exc}). {how_to} Or set the `root:` option to the folder that holds "
            f"your datasets (this one would be looked for in <root>/{folder.name})."
        ) from None


def image_transform(cfg: Common, flip: bool = False) -> transforms.Compose:
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
