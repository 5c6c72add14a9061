r"""Classifiers without class-incremental bias: "statistics" heads on the backbone's features.

A linear head trained experience by experience favours the classes it trained last (its logits for old
classes are never pushed up again). The heads here are not trained by gradient descent: they accumulate
per-class statistics of the backbone's features ``f ∈ R^D`` and classify from those, so every class is
scored by the same rule whenever it arrived.

``training.head`` choices (registry :data:`HEADS`):

``linear``
    The model's own trained head (Avalanche ``IncrementalClassifier``); :func:`build_head` returns ``None``.

``prototype`` — cosine nearest-class-mean (SimpleCIL / APER, Zhou et al. 2023)
    Per class c: count ``n_c`` and feature sum ``s_c = Σ_{i: y_i=c} f_i`` (float64, shape (K, D)); the
    prototype is ``μ_c = s_c / n_c``. Score ``z_c(f) = <f, μ_c> / (‖f‖ ‖μ_c‖)`` (cosine), prediction
    ``argmax_c z_c`` over the classes seen.

    When are means computed? Only the current experience's data is available in continual learning, so
    the default (what :class:`StatisticsHeadPlugin` does) follows SimpleCIL: a class's mean is computed
    from its training data with the backbone as it is at the end of the experience that brings the class,
    and is then kept. If a class comes back in a later experience its new samples are added to the same
    sums (so accumulating experience by experience equals computing on all the data at once). A caller that
    still has data of old classes can recompute them with the current backbone: ``head.reset(classes)``
    then :func:`update_from_dataset`.

``ranpac`` — random projection + class-prototype ridge regression (McDonnell et al., NeurIPS 2023)
    A fixed Gaussian projection ``W_rp ∈ R^{D×M}`` (entries N(0, 1), drawn once from ``seed``) and
    ``h = ReLU(f W_rp) ∈ R^M``. Accumulated over every sample of every experience (float64):

    - Gram matrix ``G = Σ_i h_i h_iᵀ`` (M×M);
    - class sums ``C = Σ_i h_i y_iᵀ`` (M×K, ``y_i`` one-hot);

    and the output weights ``W = (G + λ I)^{-1} C`` (M×K); score ``z(f) = h(f) W``, prediction
    ``argmax_c z_c`` over the classes seen.

    Choosing λ. RanPAC picks λ from a grid by fitting on part of the training data and scoring on the
    rest. Only statistics are kept here (no features), so the split is made as the samples arrive: sample
    number ``i`` of the head's whole stream (counted across experiences, in arrival order) goes to the
    validation fold when ``u(seed, i) < val_fraction``, with ``u`` a fixed integer hash (splitmix64) mapped
    to [0, 1). Its statistics are kept apart as well (``G_val``, ``C_val``), so the fit fold is
    ``G_fit = G − G_val``, ``C_fit = C − C_val``. The validation loss of a λ is the ridge objective's own
    squared error, which needs only statistics:

    ``L(λ) = Σ_{i∈val} ‖y_i − h_i W_λ‖² = n_val − 2 tr(W_λᵀ C_val) + tr(W_λᵀ G_val W_λ)``,
    ``W_λ = (G_fit + λI)^{-1} C_fit`` (evaluated for the whole grid from one eigendecomposition of
    ``G_fit``). The λ with the smallest L wins (exact ties: the larger λ); the final W is then solved on
    all the data, ``(G + λI)^{-1} C``. The default grid is ``10^-8, 10^-7, …, 10^8``. If either fold is
    empty (a handful of samples) the grid's median is used. Because the split depends only on the arrival
    index, feeding the same samples in the same order experience by experience or all at once gives the
    same folds, statistics, λ and W. Accuracy would need the features themselves, hence the squared error.

    Size. ``M`` (option ``dim``) defaults to ``min(5000, 10·D)``: 5000 for ViT-B (D = 768), as in RanPAC,
    and proportionally less for small backbones (1920 for ViT-Ti, D = 192), whose features need less
    expansion. Memory: ``G`` and ``G_val`` are 2·M²·8 bytes (400 MB at M = 5000); a solve costs O(M³)
    (about a second on a GPU, some tens of seconds on a CPU at M = 5000) and runs lazily, once per change
    of the statistics.

All heads score a batch ``features`` (N, D) as a (N, K) tensor where K is the number of class slots
(``n_classes`` if given, else the largest label seen + 1); classes not seen get ``-inf`` so ``argmax``
behaves like Avalanche's masked incremental head. ``state_dict()`` holds plain tensors and numbers
(``torch.load(weights_only=True)`` reads it back) for resuming.

Every head also takes the moment options (:mod:`.moments`): ``align`` (SLCA classifier alignment of the
linear head on Gaussian pseudo-features), ``drift`` (SDC: stored means follow the measured feature drift)
and the covariance storage; with either on, the statistics heads are refitted from the same stored
moments after each experience.

:class:`StatisticsHeadPlugin` embeds each training experience after it is trained and replaces the class-
incremental evaluation output by the head's scores; training (the linear head, its loss mask) is untouched.
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
