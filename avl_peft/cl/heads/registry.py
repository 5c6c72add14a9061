"""``training.head`` choices: the registry of classifier heads, their options and the factory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...options import parse_options
from ...registry import Registry
from .moments import MomentOptions
from .ranpac import RanpacHead, RanpacHeadOptions
from .statistics import PrototypeHead, StatisticsHead


@dataclass(frozen=True)
class LinearHeadOptions(MomentOptions):
    """The trained linear head: only the moment options (``align`` re-trains it on class Gaussians)."""


@dataclass(frozen=True)
class PrototypeHeadOptions(MomentOptions):
    """Cosine nearest-class-mean: only the moment options (``drift`` moves its prototypes)."""


@dataclass(frozen=True)
class HeadSpec:
    """A registry entry: the options dataclass and the factory (None: keep the model's trained head)."""

    options: type
    factory: Callable[..., StatisticsHead] | None


HEADS: Registry[HeadSpec] = Registry("classifier head")
HEADS.register("linear", "the trained linear head (Avalanche IncrementalClassifier)")(HeadSpec(LinearHeadOptions, None))
HEADS.register("prototype", "cosine nearest-class-mean on the backbone's features (SimpleCIL/APER)")(
    HeadSpec(PrototypeHeadOptions, lambda feature_dim, n_classes, seed, opts: PrototypeHead(feature_dim, n_classes))
)
HEADS.register("ranpac", "random ReLU projection + ridge regression on class statistics (RanPAC)")(
    HeadSpec(
        RanpacHeadOptions,
        lambda feature_dim, n_classes, seed, opts: RanpacHead(
            feature_dim, n_classes, dim=opts.dim, lambdas=opts.lambdas, val_fraction=opts.val_fraction, seed=seed
        ),
    )
)


def head_options(name: str, **options: Any) -> Any:
    """Validate ``options`` for head ``name``; the options dataclass (ConfigError naming the bad option)."""
    return parse_options(HEADS.get(name).options, f"classifier head '{name}'", options)


def build_head(
    name: str, feature_dim: int, n_classes: int | None = None, seed: int = 0, **options: Any
) -> StatisticsHead | None:
    """The head ``name`` for features of width ``feature_dim``; ``None`` for ``linear`` (keep the model's).

    ``n_classes`` fixes the number of class slots (None: grow with the largest label seen); ``seed`` draws
    RanPAC's projection and validation split.
    """
    spec = HEADS.get(name)
    opts = head_options(name, **options)
    if spec.factory is None:
        return None
    return spec.factory(feature_dim, n_classes, seed, opts)
