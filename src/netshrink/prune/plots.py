"""Pruning figures: weight histograms, accuracy vs ratio, per-layer sensitivity.

Each figure has one builder that returns a ``Figure`` (the report embeds its PNG bytes)
and a ``plot_*`` wrapper that writes it to a PNG file atomically (the stages leave those
beside their model), so both draw exactly the same picture.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from netshrink.figures import figure_png
from netshrink.prune.sensitivity import BASELINE
from netshrink.store.atomic import atomic_write_bytes

__all__ = [
    "accuracy_vs_ratio",
    "plot_accuracy_vs_ratio",
    "plot_sensitivity",
    "plot_weight_histogram",
    "sensitivity_bars",
    "weight_histogram",
]

PathLike = str | os.PathLike[str]
_DPI = 110


def _save(fig: Figure, path: PathLike) -> None:
    """Write ``fig`` to ``path`` as PNG, atomically: a report never embeds half a file."""
    atomic_write_bytes(path, figure_png(fig, dpi=_DPI))


def _values(t: Tensor) -> np.ndarray:
    return t.detach().flatten().float().cpu().numpy()


def weight_histogram(
    before: Tensor,
    after: Tensor,
    *,
    title: str = "weights",
    bins: int = 80,
    labels: tuple[str, str] = ("before", "after"),
    clip_quantile: float | None = None,
) -> Figure:
    """Histogram of weights before and after pruning (log-scale counts).

    Exact zeros get a bar of their own at 0 with their count and share written over it:
    in a plain histogram they would vanish into the bin around zero, which is exactly
    where the pruned weights came from. The other weights are drawn without the zeros,
    so the gap magnitude pruning cuts around zero shows.

    Args:
        before: the weights before pruning (any shape; several layers flattened together
            are fine).
        after: the same weights after pruning (any shape: channel pruning changes it).
        title: the figure's title, e.g. the layer's name.
        bins: histogram bins over the range of both tensors.
        labels: what to call ``before`` and ``after`` in the legend.
        clip_quantile: if given (e.g. 0.999), the range is ± that quantile of |weight|
            and the few weights beyond it are counted in the end bins: a whole network's
            weights have a long tail that would otherwise squeeze the bulk into a few bins.
    """
    b, a = _values(before), _values(after)
    both = np.concatenate([b[b != 0], a[a != 0]])
    clipped = False
    if both.size and clip_quantile is not None:
        limit = float(np.quantile(np.abs(both), clip_quantile))
        lo, hi = -limit, limit
        clipped = bool((np.abs(both) > limit).any())
    elif both.size:
        lo, hi = float(both.min()), float(both.max())
    else:
        lo, hi = -1.0, 1.0
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    width = float(edges[1] - edges[0])
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    # After: filled; before: an outline on top, so the removed weights show as the
    # outlined area with nothing under it.
    for data, label, style in ((a, labels[1], {"color": "tab:blue", "alpha": 0.7}),
                               (b, labels[0], {"color": "0.2", "histtype": "step"})):
        nonzero = data[data != 0]
        if nonzero.size:
            ax.hist(np.clip(nonzero, lo, hi), bins=edges, label=f"{label} (non-zero)", **style)
    for data, label, color, shift in ((b, labels[0], "0.3", -0.5),
                                      (a, labels[1], "tab:red", 0.5)):
        zeros = int((data == 0).sum())
        if zeros:
            ax.bar(shift * width, zeros, width=width, color=color,
                   label=f"{label}: exact zeros")
            ax.annotate(f"{zeros:,} zeros ({zeros / max(1, data.size):.1%})",
                        (shift * width, zeros), textcoords="offset points",
                        xytext=(4, 4 if shift > 0 else 16), fontsize=8, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("weight value" + (" (tails beyond the range counted in the end bins)"
                                    if clipped else ""))
    ax.set_ylabel("number of weights (log scale)")
    ax.set_title(f"{title}\n{b.size:,} weights before, {a.size:,} after, "
                 f"{int((a != 0).sum()):,} non-zero after", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_weight_histogram(
    before: Tensor, after: Tensor, path: PathLike, *, title: str = "weights", bins: int = 80
) -> None:
    """Write :func:`weight_histogram` of one layer to ``path`` (PNG)."""
    _save(weight_histogram(before, after, title=title, bins=bins), path)


def accuracy_vs_ratio(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    *,
    baseline_top1: float,
    baseline_label: str = "unpruned",
    tolerance_points: float | None = None,
    tolerance_label: str = "tolerance",
    title: str = "top-1 vs pruning ratio",
    xlabel: str = "pruning ratio",
) -> Figure:
    """Top-1 against pruning ratio, one line per method (points sorted by ratio).

    Args:
        curves: ``{label: [(ratio, top1), ...]}`` with top-1 as a fraction, e.g.
            ``{"magnitude one-shot": ..., "channel + fine-tuning": ...}``.
        baseline_top1: the unpruned model's top-1 (a dashed line).
        baseline_label: what to call that line (its top-1 is added).
        tolerance_points: draw the ``baseline - tolerance`` line too, if given.
        tolerance_label: what to call that line (``tolerance``, ``accuracy budget``).
        title / xlabel: labels.
    """
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for label, points in curves.items():
        pts = sorted(points)
        if pts:
            ax.plot([r for r, _ in pts], [100 * t for _, t in pts], marker="o",
                    markersize=4, label=label)
    ax.axhline(100 * baseline_top1, color="0.3", linestyle="--",
               label=f"{baseline_label} {100 * baseline_top1:.2f}%")
    if tolerance_points is not None:
        ax.axhline(100 * baseline_top1 - tolerance_points, color="tab:red", linestyle=":",
                   label=f"{tolerance_label} (-{tolerance_points:g} points)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.set_xlim(left=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_accuracy_vs_ratio(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: PathLike,
    *,
    baseline_top1: float,
    tolerance_points: float | None = None,
    title: str = "top-1 vs pruning ratio",
    xlabel: str = "pruning ratio",
) -> None:
    """Write :func:`accuracy_vs_ratio` to ``path`` (PNG)."""
    _save(accuracy_vs_ratio(curves, baseline_top1=baseline_top1,
                            tolerance_points=tolerance_points, title=title, xlabel=xlabel),
          path)


def sensitivity_bars(
    rows: Sequence[Mapping[str, Any]], *, ratio: float, title: str | None = None
) -> Figure:
    """One bar per layer (or group) of its top-1 drop when pruned alone at ``ratio``.

    With more than 12 layers the bars lie horizontally (first layer at the top), so long
    layer and group names stay readable.

    Args:
        rows: ``sensitivity_scan`` rows (the baseline row is skipped).
        ratio: the scan's ratio, for the title.
        title: a title to use instead of the default.
    """
    rows = [r for r in rows if r.get("layer") != BASELINE and r.get("kind") != "baseline"]
    names = [str(r["layer"]) for r in rows]
    drops = [100 * float(r["drop"]) for r in rows]
    colors = ["tab:red" if d > 0 else "tab:green" for d in drops]
    horizontal = len(rows) > 12
    size = (8, max(3.0, 0.28 * len(rows) + 1)) if horizontal else (max(6.0, 0.6 * len(rows)), 4)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    positions = list(range(len(rows)))
    label = "top-1 drop (percentage points)"
    if horizontal:
        ax.barh(positions, drops, color=colors)
        ax.set_yticks(positions, [_short(n) for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.axvline(0, color="0.3", linewidth=0.8)
    else:
        ax.bar(positions, drops, color=colors)
        ax.set_xticks(positions, [_short(n) for n in names], rotation=60, ha="right",
                      fontsize=7)
        ax.set_ylabel(label)
        ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_title(title or f"sensitivity: each layer pruned alone at ratio {ratio:g}")
    ax.grid(alpha=0.3, axis="x" if horizontal else "y")
    return fig


def plot_sensitivity(
    rows: Sequence[Mapping[str, Any]], path: PathLike, *, ratio: float, title: str | None = None
) -> None:
    """Write :func:`sensitivity_bars` to ``path`` (PNG)."""
    _save(sensitivity_bars(rows, ratio=ratio, title=title), path)


def _short(name: str, limit: int = 40) -> str:
    """A label no longer than ``limit``: long group names keep their start and end."""
    return name if len(name) <= limit else f"{name[: limit // 2 - 1]}…{name[-(limit // 2):]}"
