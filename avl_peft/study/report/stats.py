"""The report's statistics: bootstrap intervals, an exact paired test, Holm's correction, claim verdicts.

Why these (docs/design.md, "Statistics in the report", says the same for readers):

* **Interval of a mean**: the expanded percentile bootstrap of the mean over seeds (:func:`bootstrap_ci`),
  seeded so a report is reproducible; the expansion corrects the plain percentile interval's
  under-coverage at few seeds. Any bootstrap interval of a mean lies within the values' range, so it can
  cover at most 1 − 2^(1−n) (50 % at 2 seeds, 75 % at 3, 94 % at 5): below 5 seeds no interval is a 95 %
  one. The tests measure its coverage.
* **Paired comparison** of two methods on the seeds they share: the differences ``d_i = a_i − b_i`` (the
  seed fixes class order, initialisation and data order, so pairing removes that shared noise). The test
  is the **exact sign-flip permutation test** of the mean difference (:func:`sign_flip_p`): under H0 the
  sign of each ``d_i`` is exchangeable, so the p-value is the share of the ``2^n`` sign patterns whose mean
  is at least as extreme as the observed one. Exact at any n (no normal approximation, unlike a paired
  t-test), it keeps the magnitudes (unlike the sign test) and handles ties and zeros (unlike Wilcoxon's
  exact tables). Its honest limit: the smallest attainable p is ``2^-n`` one-sided and ``2^(1-n)``
  two-sided — with 3 seeds no difference can reach p < 0.05 two-sided, with 5 only one-sided
  (:func:`min_p`). Beyond :data:`EXACT_MAX` pairs the patterns are sampled (seeded Monte Carlo).
* **Multiplicity**: Holm's step-down correction (:func:`holm`), which controls the family-wise error rate
  without assuming independence and is uniformly more powerful than Bonferroni.
* **Claims** (:func:`judge`): a directional claim "A is better than B on M" holds when the one-sided test
  in the claimed direction is significant after Holm over the declared claims, does not hold when the
  one-sided test in the opposite direction is, and is inconclusive otherwise.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
from scipy import special  # t and normal quantiles

LEVEL = 0.95  # the confidence level of every interval
ALPHA = 0.05  # the family-wise error rate of every test
N_BOOT = 10_000  # bootstrap resamples: Monte Carlo error of a 2.5 % quantile ~ 0.16 % of the spread
EXACT_MAX = 16  # up to 2^16 sign patterns are enumerated; beyond, sampled
N_FLIPS = 100_000  # sampled sign patterns beyond EXACT_MAX


def _values(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"need a non-empty list of finite numbers, got {values!r}")
    return x


def bootstrap_ci(
    values: Sequence[float], *, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the expanded percentile bootstrap interval of the mean at ``level``.

    The plain percentile interval is too narrow with few values (measured: 74 % coverage at n = 3, 83 % at
    n = 5 for a nominal 95 %), because the bootstrap's spread uses the divisor n and a normal tail.
    Hesterberg's expansion (The American Statistician 69(4), 2015, "expanded percentile interval") takes the
    bootstrap quantiles at the tail α' for which the normal quantile equals √(n/(n−1))·t_{n−1}, which
    restores the nominal rate for near-normal data (tests/test_stats.py measures it at 3, 5 and 20 values).
    One value gives a zero-width interval (nothing to resample); the report shows n/a then.
    """
    x = _values(values)
    if x.size == 1:
        return float(x[0]), float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    n = x.size
    tail = float(special.ndtr(-np.sqrt(n / (n - 1)) * special.stdtrit(n - 1, 1 - (1 - level) / 2)))
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(x.mean()), float(low), float(high)


def _sign_patterns(n: int, seed: int) -> np.ndarray:
    """(patterns, n) of ±1: all 2^n when n <= EXACT_MAX, else N_FLIPS sampled ones (seeded)."""
    if n <= EXACT_MAX:
        return np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    return np.random.default_rng(seed).choice((1.0, -1.0), size=(N_FLIPS, n))


def sign_flip_p(differences: Sequence[float], *, alternative: str = "two-sided", seed: int = 0) -> float:
    """p-value of the paired sign-flip permutation test of mean(differences) = 0.

    ``alternative``: ``two-sided``, ``greater`` (the mean difference is > 0) or ``less``. The observed
    pattern is one of the enumerated ones, so p >= 2^-n (never 0). Ties with the observed statistic count
    as at least as extreme (a 1e-12 relative tolerance absorbs floating-point noise in the sums).
    """
    d = _values(differences)
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    flipped = _sign_patterns(d.size, seed) @ d
    observed = float(d.sum())
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))
    if alternative == "greater":
        hits = flipped >= observed - tol
    elif alternative == "less":
        hits = flipped <= observed + tol
    else:
        hits = np.abs(flipped) >= abs(observed) - tol
    if d.size > EXACT_MAX:  # sampled patterns: count the observed one (a valid Monte Carlo p-value)
        return float((hits.sum() + 1) / (hits.size + 1))
    return float(hits.mean())


def min_p(n: int, *, two_sided: bool = True) -> float:
    """The smallest p-value the exact sign-flip test can give with ``n`` pairs."""
    return min(1.0, 2.0 ** (1 - n) if two_sided else 2.0**-n)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (same order as given): reject H_i at α when adjusted p_i <= α."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))  # step-down: adjusted p never decreases
        adjusted[i] = running
    return adjusted.tolist()


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A vs B on one metric over their shared seeds: mean difference a − b, its interval, the test."""

    n: int
    difference: float
    low: float
    high: float
    p: float  # two-sided, before correction
    p_greater: float  # one-sided: a − b > 0
    p_less: float  # one-sided: a − b < 0


def compare(a: Sequence[float], b: Sequence[float], *, seed: int = 0, n_boot: int = N_BOOT) -> Comparison:
    """Paired comparison of ``a`` and ``b`` (equal length, entry i from the same seed)."""
    x, y = _values(a), _values(b)
    if x.size != y.size:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    d = x - y
    difference, low, high = bootstrap_ci(d, seed=seed, n_boot=n_boot)
    return Comparison(
        n=int(d.size),
        difference=difference,
        low=low,
        high=high,
        p=sign_flip_p(d, seed=seed),
        p_greater=sign_flip_p(d, alternative="greater", seed=seed),
        p_less=sign_flip_p(d, alternative="less", seed=seed),
    )


HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


def judge(comparisons: Sequence[Comparison | None], *, alpha: float = ALPHA) -> list[tuple[str, float | None]]:
    """Verdicts on directional claims "a − b > 0" (a claim of "lower is better" passes b − a, or a, b swapped).

    Holm runs over the claims that have a comparison, once for the claimed direction and once for the
    opposite one (each family of tests at ``alpha``). Returns (verdict, adjusted p of the claimed direction)
    per claim; a claim without a comparison (None: fewer than 2 shared seeds) is inconclusive with p None.
    """
    present = [i for i, c in enumerate(comparisons) if c is not None]
    forward = holm([comparisons[i].p_greater for i in present]) if present else []
    backward = holm([comparisons[i].p_less for i in present]) if present else []
    out: list[tuple[str, float | None]] = [(INCONCLUSIVE, None)] * len(comparisons)
    for k, i in enumerate(present):
        if forward[k] <= alpha:
            out[i] = (HOLDS, forward[k])
        elif backward[k] <= alpha:
            out[i] = (FAILS, forward[k])
        else:
            out[i] = (INCONCLUSIVE, forward[k])
    return out
