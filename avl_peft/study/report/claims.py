"""The report's statistics sections: intervals per configuration, paired comparisons, declared claims, search.

Built on :mod:`.stats` (the math and why it was chosen). A *configuration* is a report row: the runs of one
(method, options, strategy, head) over seeds. Sections, each only where it has something to say:

* **Confidence intervals**: mean and 95 % bootstrap interval of every metric, configurations with ≥ 2 seeds;
* **Paired comparisons**: every two configurations with the same strategy and head, on the seeds they
  share (≥ 2), for the key metrics and every claimed one: difference, its 95 % paired-bootstrap interval,
  the exact sign-flip p (two-sided), Holm-adjusted over the pairs of that metric, significant at 0.05;
* **Claims**: the study's ``claims`` (``[{better: A, than: B, metric: M}]``, optional ``head`` and
  ``strategy`` to pick one configuration per side), one-sided in the claimed direction, Holm over the
  claims: holds / does not hold / inconclusive (:func:`.stats.judge`);
* **Validation-selected hyper-parameters**: per run with a ``search``, the chosen values and their score.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from ...errors import ConfigError
from ...registry import suggest
from ...validate import is_int, is_number
from . import stats
from .runs import REPORT_METRICS, Run
from .table import markdown_cell, natural_key

# metric -> how to read it off a run; fractions (shown in %) except retention.
METRICS: dict[str, Callable[[Run], float | None]] = {
    **{m: (lambda run, m=m: run.metrics.get(m)) for m in REPORT_METRICS},
    "linear_acc": lambda run: run.linear_acc,
    "upstream_acc": lambda run: run.upstream[-1] if run.upstream else None,
    "upstream_retention": lambda run: run.upstream_retention,
}
LOWER_IS_BETTER = frozenset({"forgetting", "max_forgetting", "til_forgetting"})
UNSCALED = frozenset({"upstream_retention"})  # a ratio, not a percentage
PAIRED_METRICS = ("acc", "til_forgetting", "upstream_retention")  # compared pairwise in every report
CLAIM_KEYS = ("better", "than", "metric", "head", "strategy")


def check_claims(claims: Any) -> None:
    """ConfigError naming the claim and key unless ``claims`` is a list of well-formed claims."""
    if not isinstance(claims, list):
        raise ConfigError("claims: must be a list like [{better: head, than: full, metric: upstream_retention}]")
    for i, claim in enumerate(claims):
        where = f"claims[{i}]"
        if not isinstance(claim, dict):
            raise ConfigError(f"{where}: must be a mapping with better, than and metric")
        for key in claim:
            if key not in CLAIM_KEYS:
                raise ConfigError(
                    f"{where}: unknown key '{key}'; allowed: {', '.join(CLAIM_KEYS)}.{suggest(key, CLAIM_KEYS)}"
                )
        for key in ("better", "than", "metric"):
            if not isinstance(claim.get(key), str) or not claim[key]:
                raise ConfigError(f"{where}.{key}: required, a string (e.g. better: head, than: full, metric: acc)")
        for key in ("head", "strategy"):
            if key in claim and not isinstance(claim[key], str):
                raise ConfigError(f"{where}.{key}: must be a string")
        if claim["metric"] not in METRICS:
            raise ConfigError(
                f"{where}.metric: '{claim['metric']}' is not a report metric; choose one of {', '.join(METRICS)}."
                f"{suggest(claim['metric'], list(METRICS))}"
            )


Key = tuple[str, str, str, str]


def _groups(runs: list[Run]) -> dict[Key, dict[int, Run]]:
    """Finished runs by configuration, then by seed (a duplicate seed keeps the first run read)."""
    out: dict[Key, dict[int, Run]] = {}
    for run in runs:
        if run.status == "finished" and run.seed is not None:
            out.setdefault(run.key, {}).setdefault(run.seed, run)
    return out


def _labels(keys: list[Key]) -> dict[Key, str]:
    """Shortest readable name per configuration: the method, then options, strategy, head where they vary."""
    vary = [len({k[i] for k in keys}) > 1 for i in range(4)]
    labels = {}
    for key in keys:
        extra = [key[1]] if vary[1] and key[1] else []
        extra += [key[i] for i in (2, 3) if vary[i]]
        labels[key] = f"{key[0]} ({', '.join(extra)})" if extra else key[0]
    return labels


def _order(key: Key) -> tuple:
    """The main table's order: method, then options read naturally (rank=4 before rank=16), strategy, head."""
    return key[0], natural_key(key[1]), key[2], key[3]


def _values(group: dict[int, Run], metric: str) -> dict[int, float]:
    return {seed: v for seed, run in group.items() if (v := METRICS[metric](run)) is not None}


def _fmt(metric: str, value: float) -> str:
    return f"{value:.3f}" if metric in UNSCALED else f"{100 * value:.1f}"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def _section(title: str, blurb: list[str], head: list[str], rows: list[list[str]]) -> list[str]:
    """A report.md section: a title, a paragraph saying how to read it, and a table (cells escaped)."""
    if not rows:
        return []
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in rows]
    return [f"## {title}", "", *blurb, "", *table, ""]


def _interval_lines(groups: dict[Key, dict[int, Run]], labels: dict[Key, str]) -> list[str]:
    metrics = [m for m in METRICS if any(_values(g, m) for g in groups.values())]
    rows = []
    for key, group in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        if len(group) < 2:
            continue
        cells = [labels[key], str(len(group))]
        for metric in metrics:
            values = list(_values(group, metric).values())
            if len(values) < 2:
                cells.append("n/a")
                continue
            mean, low, high = stats.bootstrap_ci(values)
            cells.append(f"{_fmt(metric, mean)} [{_fmt(metric, low)}, {_fmt(metric, high)}]")
        rows.append(cells)
    blurb = [
        "Mean [95 % bootstrap interval] over seeds (accuracies in %, retention as a ratio; expanded percentile",
        "bootstrap, `avl_peft/study/report/stats.py`). Below 5 seeds no interval can reach 95 % coverage: a",
        "bootstrap interval stays inside the values' range, which holds the mean with probability 1 − 2^(1−n).",
    ]
    return _section("Confidence intervals", blurb, ["configuration", "seeds", *metrics], rows)


def _compare(a: dict[int, Run], b: dict[int, Run], metric: str) -> stats.Comparison | None:
    va, vb = _values(a, metric), _values(b, metric)
    shared = sorted(set(va) & set(vb))
    if len(shared) < 2:
        return None
    return stats.compare([va[s] for s in shared], [vb[s] for s in shared])


def _pair_lines(groups: dict[Key, dict[int, Run]], labels: dict[Key, str], metrics: list[str]) -> list[str]:
    rows = []
    floor = 1.0  # the smallest Holm-adjusted p any pair could reach with these seeds and this many pairs
    for metric in metrics:
        found = []
        for ka, kb in itertools.combinations(sorted(groups, key=_order), 2):
            if ka[2:] != kb[2:]:  # same strategy and head: compare methods, not classifiers
                continue
            comparison = _compare(groups[ka], groups[kb], metric)
            if comparison is not None:
                found.append((ka, kb, comparison))
        adjusted = stats.holm([c.p for _, _, c in found])
        floor = min([floor, *(len(found) * stats.min_p(c.n) for _, _, c in found)])
        for (ka, kb, c), p_holm in zip(found, adjusted):
            cells = [
                f"{labels[ka]} vs {labels[kb]}",
                metric,
                str(c.n),
                _fmt(metric, c.difference),
                f"[{_fmt(metric, c.low)}, {_fmt(metric, c.high)}]",
                _p(c.p),
                _p(p_holm),
                "yes" if p_holm <= stats.ALPHA else "no",
            ]
            rows.append(cells)
    head = ["A vs B", "metric", "seeds", "A − B", "95 % CI", "p", "p (Holm)", "significant?"]
    blurb = [
        "On the seeds both configurations share: mean difference A − B, paired bootstrap interval, exact sign-flip",
        "permutation p (two-sided), Holm-adjusted over the pairs of each metric; significant at 0.05. With n",
        "shared seeds the smallest possible p is 2^(1−n) (0.25 at 3 seeds, 0.0625 at 5).",
    ]
    if rows and floor > stats.ALPHA:
        pairs = max(sum(1 for row in rows if row[1] == metric) for metric in metrics)
        needed = next(n for n in itertools.count(2) if pairs * stats.min_p(n) <= stats.ALPHA)
        blurb += [
            "",
            f"**No pair here can reach significance:** with {pairs} pairs per metric the smallest Holm-adjusted p",
            f"these seeds allow is {floor:.3g}. Declare the comparisons you mean to test as `claims` (Holm over",
            f"fewer tests, one-sided), or run ≥ {needed} seeds for {pairs} pairs.",
        ]
    return _section("Paired comparisons", blurb, head, rows)


def _match(side: str, claim: dict, groups: dict[Key, dict[int, Run]], labels: dict[Key, str]) -> list[Key]:
    return [
        key
        for key in groups
        if side in (key[0], labels[key], f"{key[0]} ({key[1]})")
        and claim.get("strategy", key[2]) == key[2]
        and claim.get("head", key[3]) == key[3]
    ]


def judge_claims(claims: list[dict], runs: list[Run]) -> list[dict[str, Any]]:
    """One verdict per claim: {claim, verdict, n, difference, low, high, p_holm, note}."""
    groups = _groups(runs)
    labels = _labels(list(groups))
    comparisons: list[stats.Comparison | None] = []
    notes: list[str] = []
    for claim in claims:
        sides = [_match(claim[k], claim, groups, labels) for k in ("better", "than")]
        note = ""
        for name, found in zip((claim["better"], claim["than"]), sides):
            if len(found) != 1 and not note:
                which = ", ".join(labels[k] for k in found)
                note = (
                    f"no finished runs of '{name}'"
                    if not found
                    else f"'{name}' matches {len(found)} configurations ({which}); add head: or strategy:"
                )
        comparison = None
        if not note:
            a, b = groups[sides[0][0]], groups[sides[1][0]]
            if claim["metric"] in LOWER_IS_BETTER:
                a, b = b, a  # "better" means lower: test than − better > 0
            comparison = _compare(a, b, claim["metric"])
            note = "fewer than 2 shared seeds" if comparison is None else ""
        comparisons.append(comparison)
        notes.append(note)
    out = []
    for claim, comparison, note, (verdict, p_holm) in zip(claims, comparisons, notes, stats.judge(comparisons)):
        entry = {"claim": claim, "verdict": verdict, "p_holm": p_holm, "note": note}
        if comparison is not None:
            entry.update(n=comparison.n, difference=comparison.difference, low=comparison.low, high=comparison.high)
        out.append(entry)
    return out


def _claim_lines(claims: list[dict], runs: list[Run]) -> list[str]:
    if not claims:
        return []
    rows = []
    for entry in judge_claims(claims, runs):
        claim, metric = entry["claim"], entry["claim"]["metric"]
        where = ", ".join(f"{k} {claim[k]}" for k in ("strategy", "head") if k in claim)
        text = f"{claim['better']} better than {claim['than']} on {metric}" + (f" ({where})" if where else "")
        if "n" in entry:
            low, high = _fmt(metric, entry["low"]), _fmt(metric, entry["high"])
            diff = f"{_fmt(metric, entry['difference'])} [{low}, {high}]"
            cells = [text, str(entry["n"]), diff, _p(entry["p_holm"]), f"**{entry['verdict']}**"]
        else:
            cells = [text, "0", "n/a", "n/a", f"**{entry['verdict']}** ({entry['note']})"]
        rows.append(cells)
    blurb = [
        'Each claim tested one-sided in its direction (lower is better for forgetting metrics; "better by" is',
        "the mean margin in the claimed direction, negative when the data point the other way) with the exact",
        "sign-flip test on shared seeds, Holm over the claims: **holds** if significant at 0.05, **does not hold**",
        "if the opposite direction is, else **inconclusive**.",
    ]
    return _section("Claims", blurb, ["claim", "seeds", "better by [95 % CI]", "p (Holm)", "verdict"], rows)


def _trials(block: dict) -> list[dict]:
    """A search block's well-formed trials (a dict with a ``values`` dict), in grid order."""
    trials = block.get("trials")
    if not isinstance(trials, list):
        return []
    return [t for t in trials if isinstance(t, dict) and isinstance(t.get("values"), dict)]


def _trial_text(trials: list[dict]) -> str:
    """Every trial as ``value: score`` (several searched keys: ``k=v, k=v: score``), in grid order."""
    parts = []
    for trial in trials:
        values = trial["values"]
        name = ", ".join(f"{k}={v}" for k, v in values.items()) if len(values) != 1 else str(*values.values())
        score = trial.get("score")
        parts.append(f"{name}: {score:.3f}" if is_number(score) else f"{name}: n/a")
    return "; ".join(parts)


def _at_grid_end(chosen: dict, trials: list[dict]) -> bool:
    """True when a one-key search of ≥ 3 candidates chose its first or last value: the best may lie beyond."""
    if len(chosen) != 1:
        return False
    [(key, value)] = chosen.items()
    grid = [t["values"].get(key) for t in trials]
    return len(grid) >= 3 and value in (grid[0], grid[-1])


def _search_lines(runs: list[Run]) -> list[str]:
    """One row per selection: per run (``validation.per: run``), or one for all the runs of a configuration
    that share it (``per: variant``: the same trials, chosen once)."""
    labels = _labels(list(_groups(runs)))
    selections: dict[Any, tuple[Run, list[str]]] = {}
    for run in sorted(runs, key=lambda r: (_order(r.key), natural_key(r.run_id))):
        block = run.search
        if run.status != "finished" or not isinstance(block, dict) or not isinstance(block.get("chosen"), dict):
            continue
        trials = _trials(block)
        if block.get("per") == "variant":
            key: Any = (run.key, repr(block.get("chosen")), _trial_text(trials))
        else:
            key = run.run_id
        selections.setdefault(key, (run, []))[1].append(run.run_id)
    rows = []
    for run, ids in selections.values():
        block = run.search
        trials = _trials(block)
        validation = block.get("validation") if isinstance(block.get("validation"), dict) else {}
        score = block.get("chosen_score")
        score_text = f"{score:.4f}" if is_number(score) else "n/a"
        tied = block.get("tied")
        if is_int(tied) and tied > 1:
            score_text += f" ({tied} tied: first in grid order)"
        chosen = ", ".join(f"{k} = {v}" for k, v in block["chosen"].items())
        if _at_grid_end(block["chosen"], trials):
            chosen += " (grid end)"
        shared = block.get("per") == "variant"
        who = f"{labels.get(run.key, run.method)} ({len(ids)} runs)" if shared else run.run_id
        how = f"per variant, seed {block.get('seed', '?')}" if shared else "per run"
        rows.append(
            [
                who,
                chosen,
                f"{block.get('metric', '?')} {score_text}",
                _trial_text(trials),
                f"{how}; {validation.get('experiences', '?')}, {validation.get('fraction', '?')}",
            ]
        )
    blurb = [
        "Chosen on a validation split carved from the training data (never the test set), per run or once per",
        "configuration for all its seeds (`validation.per`); `results.json` → `search` has every trial. A tie means",
        "the split could not tell the candidates apart; a choice marked (grid end) is the first or last value of the",
        "grid, and the best value may lie beyond it: widen the grid.",
    ]
    head = ["runs", "chosen", "validation score", "every candidate: score", "selection; experiences, fraction"]
    return _section("Validation-selected hyper-parameters", blurb, head, rows)


def statistics_sections(runs: list[Run], claims: list[dict] | None = None) -> list[str]:
    """The report.md lines of every statistics section that has something to show."""
    claims = claims or []
    groups = _groups(runs)
    labels = _labels(list(groups))
    metrics = list(dict.fromkeys([*PAIRED_METRICS, *(c["metric"] for c in claims)]))
    return [
        *_interval_lines(groups, labels),
        *_pair_lines(groups, labels, metrics),
        *_claim_lines(claims, runs),
        *_search_lines(runs),
    ]
