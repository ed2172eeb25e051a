"""Where netshrink's progress lines go: the ``netshrink`` logger and its children.

Every ``log=`` parameter of the library takes a caller's own sink (a callable of one
line) and defaults to the INFO method of its module's logger (``LOG.info``), so a caller
who configures nothing sees nothing (the package logger has a ``NullHandler``),
``logging.basicConfig(level=logging.INFO)`` shows the lines, and the ``netshrink``
command prints them (``netshrink.cli.output``).
"""

from __future__ import annotations

__all__ = ["no_log"]


def no_log(_: str) -> None:
    """A sink that drops every line (``quiet=True``)."""
