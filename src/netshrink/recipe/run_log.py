"""The run's own log file, ``run.log`` in its folder: every progress line the run shows,
timestamped, so that a run started in the background (or by a scheduler) can be followed
and read afterwards without redirecting its output.

Lines come first to the caller's sink (the terminal, the ``netshrink`` logger) and are
written to the file only once the run's checks have passed and it owns the folder: a run
refused before that (a wrong path, bad data) leaves nothing behind. The lines shown before
that moment are kept and written first. A resumed run appends.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from netshrink.store.layout import RUN_LOG

__all__ = ["RunLog"]


class RunLog:
    """A sink of one line that passes each line on to ``sink`` and, once ``open`` was
    called, appends it to ``out/run.log``."""

    def __init__(self, out: Path, sink: Callable[[str], None]) -> None:
        self.path = out / RUN_LOG
        self.sink = sink
        self._early: list[str] = []
        self._file: TextIO | None = None

    def __call__(self, line: str) -> None:
        self.sink(line)
        stamped = f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')} {line}"
        if self._file is None:
            self._early.append(stamped)
        else:
            self._write(stamped)

    def open(self) -> None:
        """Start writing the file (appending): the run owns its folder now."""
        if self._file is not None:
            return
        # never through a link planted in its place (netshrink.store.walls)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        for line in self._early:
            self._write(line)
        self._early.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, line: str) -> None:
        assert self._file is not None
        self._file.write(line + "\n")
        self._file.flush()  # followed live (tail -f), and whole if the run is killed
