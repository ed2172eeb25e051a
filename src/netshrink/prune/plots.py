"""Pruning figures as PNG files: weight histograms, accuracy vs ratio, per-layer sensitivity.

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, never
through ``pyplot``: no global figure registry to leak from, no GUI backend to pick, and
safe to call from any thread. Each PNG is rendered to bytes and written atomically, so a
report never embeds half a file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from netshrink.prune.sensitivity import BASELINE
from netshrink.store.atomic import atomic_write_bytes

__all__ = ["plot_accuracy_vs_ratio", "plot_sensitivity", "plot_weight_histogram"]

PathLike = str | os.PathLike[str]


def _save(fig: Figure, path: PathLike) -> None:
    """Render ``fig`` to PNG bytes and write them to ``path`` atomically."""
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_weight_histogram(
    before: Tensor, after: Tensor, path: PathLike, *, title: str = "weights", bins: int = 80
) -> None:
    """Histogram of one layer's weights before and after pruning (log-scale counts).

    Exact zeros get a bar of their own at 0 with its count written over it: in a plain
    histogram they would vanish into the bin around zero, which is exactly where the
    pruned weights came from. The other weights are drawn without the zeros, so the gap
    magnitude pruning cuts around zero shows.

    Args:
        before: the layer's weights before pruning (any shape).
        after: the same layer after pruning (any shape: channel pruning changes it).
        path: where the PNG goes.
        title: the figure's title, e.g. the layer's name.
        bins: histogram bins over the range of both tensors.
    """
    b = before.detach().flatten().float().cpu()
    a = after.detach().flatten().float().cpu()
    lo = float(torch.minimum(b.min(), a.min())) if b.numel() and a.numel() else -1.0
    hi = float(torch.maximum(b.max(), a.max())) if b.numel() and a.numel() else 1.0
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    edges = torch.linspace(lo, hi, bins + 1)
    width = float(edges[1] - edges[0])
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    # After: filled; before: an outline on top, so the removed weights show as the
    # outlined area with nothing under it.
    for data, label, style in ((a, "after", {"color": "tab:blue", "alpha": 0.7}),
                               (b, "before", {"color": "0.2", "histtype": "step"})):
        nonzero = data[data != 0].numpy()
        if nonzero.size:
            ax.hist(nonzero, bins=edges.numpy(), label=f"{label} (non-zero)", **style)
    zeros_b, zeros_a = int((b == 0).sum()), int((a == 0).sum())
    for zeros, total, label, color, shift in ((zeros_b, b.numel(), "before", "0.3", -0.5),
                                              (zeros_a, a.numel(), "after", "tab:red", 0.5)):
        if zeros:
            ax.bar(shift * width, zeros, width=width, color=color,
                   label=f"{label}: exact zeros")
            ax.annotate(f"{zeros:,} zeros ({zeros / max(1, total):.0%})",
                        (shift * width, zeros), textcoords="offset points", xytext=(4, 4),
                        fontsize=8, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("weight value")
    ax.set_ylabel("count (log scale)")
    ax.set_title(f"{title}: {b.numel():,} weights before, {a.numel():,} after, "
                 f"{int((a != 0).sum()):,} non-zero after")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_accuracy_vs_ratio(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: PathLike,
    *,
    baseline_top1: float,
    tolerance_points: float | None = None,
    title: str = "top-1 vs pruning ratio",
    xlabel: str = "pruning ratio",
) -> None:
    """Top-1 against pruning ratio, one line per method (points sorted by ratio).

    Args:
        curves: ``{label: [(ratio, top1), ...]}`` with top-1 as a fraction, e.g.
            ``{"magnitude one-shot": ..., "channel + fine-tuning": ...}``.
        path: where the PNG goes.
        baseline_top1: the unpruned model's top-1 (a dashed line).
        tolerance_points: draw the ``baseline - tolerance`` line too, if given.
        title / xlabel: labels.
    """
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for label, points in curves.items():
        pts = sorted(points)
        if pts:
            ax.plot([r for r, _ in pts], [100 * t for _, t in pts], marker="o",
                    markersize=4, label=label)
    ax.axhline(100 * baseline_top1, color="0.3", linestyle="--",
               label=f"unpruned {100 * baseline_top1:.2f}%")
    if tolerance_points is not None:
        ax.axhline(100 * baseline_top1 - tolerance_points, color="tab:red", linestyle=":",
                   label=f"tolerance (-{tolerance_points:g} points)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.set_xlim(left=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_sensitivity(
    rows: Sequence[Mapping[str, Any]], path: PathLike, *, ratio: float, title: str | None = None
) -> None:
    """One bar per layer (or group) of its top-1 drop when pruned alone at ``ratio``.

    With more than 12 layers the bars lie horizontally (first layer at the top), so long
    layer and group names stay readable.

    Args:
        rows: ``sensitivity_scan`` rows (the baseline row is skipped).
        path: where the PNG goes.
        ratio: the scan's ratio, for the title.
        title: a title to use instead of the default.
    """
    rows = [r for r in rows if r.get("layer") != BASELINE and r.get("kind") != "baseline"]
    names = [str(r["layer"]) for r in rows]
    drops = [100 * float(r["drop"]) for r in rows]
    colors = ["tab:red" if d > 0 else "tab:green" for d in drops]
    horizontal = len(rows) > 12
    size = (8, max(3.0, 0.28 * len(rows) + 1)) if horizontal else (max(6.0, 0.6 * len(rows)), 4)
    fig = Figure(figsize=size)
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
    _save(fig, path)


def _short(name: str, limit: int = 40) -> str:
    """A label no longer than ``limit``: long group names keep their start and end."""
    return name if len(name) <= limit else f"{name[: limit // 2 - 1]}…{name[-(limit // 2):]}"
