"""One way to turn a matplotlib figure into PNG bytes, for the report and the stage plots,
and one way to label a plot's points without one label over another.

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, never
through ``pyplot``: pyplot keeps global state (a current figure, a chosen backend) that
would leak between calls and break under a GUI backend or threads.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

DPI = 100


def figure_png(fig: Figure, *, dpi: int = DPI) -> bytes:
    """``fig`` rendered as PNG bytes, trimmed to what is drawn.

    No "Software" entry is written: the bytes then depend on the data only, not on the
    matplotlib version, so regenerated reports and plots diff cleanly.
    """
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


# Where a point's label may go, nearest first: (dx, dy) in points from the point, and the
# label's alignment there. The outer ring is drawn with a leader line.
_NEAR = ((6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"),
         (-6, -4, "right", "top"), (0, 8, "center", "bottom"), (0, -8, "center", "top"),
         (10, 0, "left", "center"), (-10, 0, "right", "center"))
_FAR = ((8, 16, "left", "bottom"), (8, -16, "left", "top"), (-8, 16, "right", "bottom"),
        (-8, -16, "right", "top"), (0, 22, "center", "bottom"), (0, -22, "center", "top"))


def freeze_layout(fig: Figure) -> RendererAgg:
    """Lay ``fig`` out once and keep it so: axes positions and every legend's place fixed.

    Text placed after this (point labels) is measured where it will be drawn; with the
    layout engine left on, the axes would move when the labels are added, and a legend
    at ``loc="best"`` would jump onto them (it steers clear of texts).
    """
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:
            box = legend.get_window_extent(renderer).transformed(ax.transAxes.inverted())
            legend.set_loc((box.x0, box.y0))
    return renderer


def place_labels(ax: Axes, points: Sequence[tuple[float, float, str]], *,
                 fontsize: float = 9, marker_px: float = 5.0) -> int:
    """Write each ``(x, y, label)`` next to its point where it overlaps no other label,
    no other point and no legend, and stays inside the axes; a label with no such place
    is left off (the caller says so). Points are placed in the order given, so the most
    important come first. Returns how many labels were left off.

    A label that overlaps another is unreadable twice over; a crowded plot (a study's
    dozens of candidates) labels what fits and the report's table names every point.
    """
    renderer = freeze_layout(ax.figure)
    inside = ax.get_window_extent(renderer)
    taken = [legend.get_window_extent(renderer) for legend in (ax.get_legend(),)
             if legend is not None]
    taken += [t.get_window_extent(renderer) for t in ax.texts if t.get_text()]
    spots = ax.transData.transform([(x, y) for x, y, _ in points]) if points else []
    marks = [Bbox.from_extents(px - marker_px, py - marker_px, px + marker_px, py + marker_px)
             for px, py in spots]
    left_off = 0
    for k, (x, y, label) in enumerate(points):
        others = [m for j, m in enumerate(marks) if j != k]
        for far, (dx, dy, ha, va) in [*((False, c) for c in _NEAR),
                                      *((True, c) for c in _FAR)]:
            note = ax.annotate(
                label, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                fontsize=fontsize,
                arrowprops={"arrowstyle": "-", "color": "0.55", "linewidth": 0.6,
                            "shrinkA": 0, "shrinkB": 3} if far else None)
            box = note.get_window_extent(renderer)
            if (inside.containsx(box.x0) and inside.containsx(box.x1)
                    and inside.containsy(box.y0) and inside.containsy(box.y1)
                    and not any(box.overlaps(b) for b in (*taken, *others))):
                taken.append(box)
                break
            note.remove()
        else:
            left_off += 1
    return left_off
