r"""Classifiers without class-incremental bias: "statistics" heads on the backbone's features.

A linear head trained experience by experience favours the classes it trained last; these heads accumulate
per-class statistics of the backbone's features and classify from them, so every class is scored by the
same rule whenever it arrived. ``training.head`` choices (registry :data:`HEADS`): ``linear`` (the trained
head), ``prototype`` (cosine nearest-class-mean, SimpleCIL/APER) and ``ranpac`` (random projection + ridge
regression, RanPAC). Formulas, when means are computed, how RanPAC chooses λ from statistics only, sizes:
docs/design.md, "Statistics heads".
"""

from .moments import AlignOptions, ClassMoments, DriftOptions, MomentOptions, align_linear
from .plugin import StatisticsHeadPlugin, backbone_features, prompted_vit_features, update_from_dataset
from .ranpac import RanpacHead, RanpacHeadOptions
from .registry import HEADS, HeadSpec, build_head, head_options
from .statistics import DEFAULT_LAMBDAS, PrototypeHead, StatisticsHead, default_ranpac_dim

__all__ = [
    "AlignOptions",
    "ClassMoments",
    "DEFAULT_LAMBDAS",
    "DriftOptions",
    "MomentOptions",
    "align_linear",
    "RanpacHeadOptions",
    "HEADS",
    "HeadSpec",
    "PrototypeHead",
    "RanpacHead",
    "StatisticsHead",
    "StatisticsHeadPlugin",
    "backbone_features",
    "build_head",
    "default_ranpac_dim",
    "head_options",
    "prompted_vit_features",
    "update_from_dataset",
]
