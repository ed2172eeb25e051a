"""One way to turn a matplotlib figure into PNG bytes, for the report and the stage plots.

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, never
through ``pyplot``: pyplot keeps global state (a current figure, a chosen backend) that
would leak between calls and break under a GUI backend or threads.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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
