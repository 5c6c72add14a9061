"""Report plots: accuracy-matrix heatmaps and forgetting scatter plots (matplotlib, no display)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import AvlPeftError
from ...instruments.metrics import MATRIX_KINDS, validate_matrix
from ...safeio import safe_component, write_bytes_nofollow
from .runs import Run


def write_plots(
    runs: list[Run], rows: list[dict[str, Any]], plots_dir: Path, *, root: Path | None = None
) -> list[Path]:
    """Write every plot the data allow and return their paths (summary plots first).

    Each figure is rendered in memory and written with safeio's no-follow write below ``root`` (default: the
    parent of ``plots_dir``), so a planted symbolic link is never written through. Text from the results
    files (run ids, method names, options) is drawn literally: mathtext is off (a ``$`` in a run id would
    otherwise be parsed, and an unbalanced one raise), and long labels are shortened.
    """
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        return _write_plots(runs, rows, plots_dir, root=Path(plots_dir).parent if root is None else root)


def _short(text: str, limit: int = 60) -> str:
    """A label of at most ``limit`` characters: a 10,000-character run id would widen a figure without end."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _write_plots(runs: list[Run], rows: list[dict[str, Any]], plots_dir: Path, *, root: Path) -> list[Path]:
    written: list[Path] = []
    finished_rows = [row for row in rows if row["status"] == "finished"]
    params = ("trainable_params", "trainable parameters (log scale)", True)
    scatters = [
        (FORGETTING, params, "forgetting_vs_params.png"),
        (FORGETTING, ("overlap_mean", "mean subspace overlap", False), "forgetting_vs_overlap.png"),
        (FORGETTING, ("alignment_mean", "mean subspace alignment", False), "forgetting_vs_alignment.png"),
        (RETENTION, params, "upstream_retention_vs_params.png"),
    ]
    # Colours are assigned once over all methods so a method looks the same in every plot.
    methods = sorted({row["method"] for row in finished_rows})
    for y_axis, x_axis, filename in scatters:
        if _plot_scatter(finished_rows, methods, y_axis, x_axis, plots_dir / filename, root):
            written.append(plots_dir / filename)

    if _plot_upstream(runs, plots_dir / "upstream_acc.png", root):
        written.append(plots_dir / "upstream_acc.png")

    used_names: set[str] = set()
    for run in sorted((r for r in runs if r.status == "finished"), key=lambda r: r.run_id):
        matrices = {}
        for kind in MATRIX_KINDS:
            if kind not in run.matrices:
                continue
            try:
                matrices[kind] = validate_matrix(run.matrices[kind], f"accuracy_matrix['{kind}']")
            except AvlPeftError as exc:
                warnings.warn(f"no heatmap for {kind} of {run.path}: {exc}", stacklevel=3)
        if not matrices:
            continue
        path = plots_dir / f"acc_matrix_{_unique_name(safe_component(run.run_id), used_names)}.png"
        _plot_accuracy_matrices(matrices, run.run_id, path, root)
        written.append(path)
    return written


def _unique_name(name: str, used: set[str]) -> str:
    # Run ids should be unique, but copies of a run folder happen; never let one heatmap overwrite another.
    candidate, n = name, 2
    while candidate in used:
        candidate, n = f"{name}-{n}", n + 1
    used.add(candidate)
    return candidate


def _new_figure(width: float, height: float) -> Any:
    # An Agg canvas on a bare Figure instead of pyplot: no global backend switch in the caller's process,
    # no figure registry to leak memory through, and nothing can ever open a window.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path, root: Path, *, tight: bool = False) -> None:
    """``tight``: crop to the drawn content (a legend placed beside the axes); heatmaps keep their capped size."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight" if tight else None)
    write_bytes_nofollow(path, buffer.getvalue(), root=root)


# Inches per heatmap panel at most (at 100 dpi): a 500-experience matrix still makes a 1,200-pixel panel
# instead of a 27,000-pixel one that would take gigabytes to render.
_MAX_PANEL_INCHES = 12.0


def _plot_accuracy_matrices(matrices: dict[str, np.ndarray], run_id: str, path: Path, root: Path) -> None:
    import matplotlib

    size = max(m.shape[0] for m in matrices.values())
    side = min(max(3.5, 0.55 * size + 1.5), _MAX_PANEL_INCHES)
    figure = _new_figure(side * len(matrices) + 1.0, side + 0.5)
    axes = figure.subplots(1, len(matrices), squeeze=False)[0]
    # Cells above the diagonal (not yet trained experiences) are NaN in validated matrices: draw them grey.
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = None
    for ax, (kind, matrix) in zip(axes, matrices.items(), strict=True):
        T = matrix.shape[0]
        image = ax.imshow(np.ma.masked_invalid(matrix * 100), vmin=0, vmax=100, cmap=cmap)
        if T <= 20:  # beyond that the numbers no longer fit in the cells
            fontsize = max(5, 10 - T // 3)
            for t in range(T):
                for i in range(t + 1):
                    value = matrix[t, i] * 100
                    colour = "white" if value < 50 else "black"  # readable on viridis' dark and light ends
                    ax.text(i, t, f"{value:.1f}", ha="center", va="center", color=colour, fontsize=fontsize)
        ax.set_title(kind.replace("_", "-"))
        ax.set_xlabel("evaluated on experience i")
        ax.set_ylabel("after training experience t")
        ticks = range(0, T, max(1, T // 10))
        ax.set_xticks(list(ticks))
        ax.set_yticks(list(ticks))
    figure.colorbar(image, ax=list(axes), label="accuracy (%)", shrink=0.8)
    figure.suptitle(f"Accuracy matrix: {_short(run_id)}")
    _save(figure, path, root)


# y axes of the scatter plots: (row key without _mean/_std, label, scale to the axis unit)
FORGETTING = ("forgetting", "forgetting, class-incremental (%)", 100.0)
RETENTION = ("upstream_retention", "upstream retention (1 = pretrained accuracy kept)", 1.0)


def _plot_scatter(
    rows: list[dict[str, Any]],
    all_methods: list[str],
    y_axis: tuple[str, str, float],
    x_axis: tuple[str, str, bool],
    path: Path,
    root: Path,
) -> bool:
    """One metric (mean ± std over seeds) against one column, one colour per method; False if no data."""
    import matplotlib

    (y_key, y_label, scale), (x_key, x_label, log_x) = y_axis, x_axis
    points = [
        row
        for row in rows
        if row.get(x_key) is not None
        and row.get(f"{y_key}_mean") is not None
        and (not log_x or row[x_key] > 0)  # a log axis cannot place 0 trainable parameters
    ]
    if not points:
        return False
    methods = sorted({row["method"] for row in points})
    cmap = matplotlib.colormaps["tab10" if len(all_methods) <= 10 else "tab20"]
    figure = _new_figure(7.0, 4.5)
    ax = figure.subplots()
    for method in methods:
        mine = [row for row in points if row["method"] == method]
        ax.errorbar(
            [row[x_key] for row in mine],
            [row[f"{y_key}_mean"] * scale for row in mine],
            yerr=[(row.get(f"{y_key}_std") or 0.0) * scale for row in mine],
            fmt="o",
            capsize=3,
            color=cmap(all_methods.index(method) % cmap.N),
            label=_short(method),
        )
        for row in mine:
            label = ", ".join(part for part in (row["options"], row["strategy"]) if part)
            ax.annotate(
                _short(label),
                (row[x_key], row[f"{y_key}_mean"] * scale),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(f"{y_label.split(' (')[0].split(',')[0].capitalize()} vs {x_label.split(' (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(title="method", fontsize=8)
    _save(figure, path, root)
    return True


def _plot_upstream(runs: list[Run], path: Path, root: Path) -> bool:
    """Upstream accuracy against experience (−1 = the model as built), one line per configuration, mean
    over seeds; False when no run measured it.

    The classifier head only reads the backbone, so configurations that differ only in ``training.head``
    train the same backbone: their curves are drawn once, labelled with every head that produced them.
    """
    import matplotlib

    groups: dict[tuple[str, ...], dict[Any, list[float]]] = {}  # configuration -> seed -> curve
    heads: dict[tuple[str, ...], set[str]] = {}
    for run in runs:
        if run.status == "finished" and run.upstream:
            method, options, strategy, head = run.key
            seed = run.seed if run.seed is not None else run.run_id
            groups.setdefault((method, options, strategy), {}).setdefault(seed, run.upstream)
            heads.setdefault((method, options, strategy), set()).add(head or "linear")
    if not groups:
        return False
    fig = _new_figure(13.0 if len(groups) > 6 else 7.5, 4.5)  # room for a legend beside many lines
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    for i, (key, by_seed) in enumerate(sorted(groups.items())):
        curves = list(by_seed.values())  # one per seed: another head of the same seed trained the same backbone
        length = min(len(c) for c in curves)
        values = np.nanmean(np.array([c[:length] for c in curves]) * 100, axis=0)
        label = " ".join(p for p in key if p)
        ax.plot(
            range(-1, length - 1),
            values,
            marker="os^Dv<>ph*"[i % 10],
            color=cmap(i % cmap.N),
            label=_short(f"{label} [{', '.join(sorted(heads[key]))}] (n={len(curves)})", 100),
        )
    ax.set_xlabel("experience (−1: before training)")
    ax.set_ylabel("upstream accuracy (%)")
    ax.set_title("Pretrained knowledge kept: upstream accuracy after each experience")
    ax.grid(alpha=0.3)
    if len(groups) > 6:  # many lines: the legend beside the axes, not over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7, loc="best")
    _save(fig, path, root, tight=True)
    return True
