"""``--quiet`` and ``--json-log``: what a command's progress lines become.

Every part of netshrink reports progress as lines on standard output (and, on a
terminal, bars on standard error). For scripts, ``--json-log`` turns each line into one
JSON object (``{"time", "elapsed_s", "message"}``) and ``--quiet`` drops them; both turn
the bars off. Errors still go to standard error as one plain line.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import TextIO

FLAGS = ("--quiet", "--json-log")


class _JsonLines(io.TextIOBase):
    """A text stream that writes each complete line to ``out`` as a JSON object."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.started, self.pending = out, time.perf_counter(), ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.out.write(json.dumps({
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "elapsed_s": round(time.perf_counter() - self.started, 1),
                    "message": line}) + "\n")
        self.out.flush()
        return len(text)


class _NoTerminal(io.TextIOBase):
    """Standard error that passes text through but says it is no terminal: progress bars
    (drawn only on a terminal) stay off under ``--quiet`` / ``--json-log``."""

    def __init__(self, err: TextIO) -> None:
        self.err = err

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        return self.err.write(text)

    def flush(self) -> None:
        self.err.flush()


def split_flags(argv: Sequence[str]) -> tuple[list[str], str]:
    """``argv`` without the output flags (allowed anywhere), and the mode they ask for:
    ``text``, ``quiet`` or ``json``."""
    mode = "text"
    rest = []
    for arg in argv:
        if arg == "--quiet":
            mode = "quiet"
        elif arg == "--json-log":
            mode = "json"
        else:
            rest.append(arg)
    return rest, mode


@contextlib.contextmanager
def output_mode(mode: str) -> Iterator[None]:
    """Standard output (and error's terminal-ness) as ``mode`` asks, restored after."""
    if mode == "text":
        yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout = _JsonLines(out) if mode == "json" else io.StringIO()
    sys.stderr = _NoTerminal(err)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout, sys.stderr = out, err
