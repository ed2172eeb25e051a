"""Number formatting shared by every table, so Markdown and HTML show the same strings."""

from __future__ import annotations

MISSING = "–"  # en dash: what a cell shows when the field was not measured
MB = 1_000_000  # sizes are decimal megabytes; the report says so


def pct(fraction: float | None) -> str:
    """A [0, 1] fraction as a percentage with 2 decimals, no sign: ``0.7123`` → ``71.23``."""
    return MISSING if fraction is None else f"{fraction * 100:.2f}"


def points(delta: float | None) -> str:
    """A signed difference in percentage points: ``+0.12``, ``-0.40``."""
    return MISSING if delta is None else f"{delta:+.2f}"


def ratio(value: float | None) -> str:
    """A ratio as ``4.00x``."""
    return MISSING if value is None else f"{value:.2f}x"


def times(value: float) -> str:
    """A ratio for prose: 2 decimals near 1 where they matter, 1 decimal above 2x."""
    return f"{value:.2f}x" if value < 2 else f"{value:.1f}x"


def megabytes(size_bytes: int | None) -> str:
    """Bytes as decimal MB with one decimal: ``44_700_000`` → ``44.7 MB``."""
    return MISSING if size_bytes is None else f"{size_bytes / MB:.1f} MB"


def count(n: int | None) -> str:
    """A parameter count in millions: ``11_689_512`` → ``11.69 M``."""
    return MISSING if n is None else f"{n / 1e6:.2f} M"


def macs(n: int | None) -> str:
    """Multiply-accumulates in M below one billion, G above: ``1.82 G``, ``456.3 M``."""
    if n is None:
        return MISSING
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.1f} M"


def ms(value: float | None) -> str:
    """Milliseconds with 2 decimals (sub-millisecond models are common on GPU)."""
    return MISSING if value is None else f"{value:.2f}"


def seconds(value: float | None) -> str:
    """A duration: ``12.3 s``, ``4 min 05 s``, ``1 h 02 min``."""
    if value is None:
        return MISSING
    if value < 60:
        return f"{value:.1f} s"
    whole = round(value)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {(whole % 3600) // 60:02d} min"


def number(value: float | None, spec: str = ".4g") -> str:
    """Any float with a format spec (learning rates, losses)."""
    return MISSING if value is None else format(value, spec)
