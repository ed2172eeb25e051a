"""``--quiet`` and ``--json-log``: what a command's progress lines become.

The library logs its progress to the ``netshrink`` loggers; the command prints those
lines on standard output (and, on a terminal, training draws bars on standard error).
For scripts, ``--json-log`` turns each line into one JSON object (``{"time",
"elapsed_s", "message"}``) and ``--quiet`` drops them; both turn the bars off. Errors
still go to standard error as one plain line.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import TextIO

FLAGS = ("--quiet", "--json-log")


class _JsonLines(io.TextIOBase):
    """A text stream that writes each complete line to ``out`` as a JSON object (from
    any thread: a heartbeat's line may come while the command prints)."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.started, self.pending = out, time.perf_counter(), ""
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
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
def progress_lines(stream: TextIO) -> Iterator[None]:
    """The ``netshrink`` loggers' INFO lines printed on ``stream``, as plain lines (the
    library's progress; ``--json-log`` wraps the stream), until the block ends.

    The stream is the one given, not ``sys.stdout`` at each line: a step that silences
    a runtime's own prints (``redirect_stdout``) must not silence a heartbeat that comes
    from another thread meanwhile."""
    package = logging.getLogger("netshrink")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = package.level
    package.setLevel(logging.INFO)
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


@contextlib.contextmanager
def output_mode(mode: str) -> Iterator[None]:
    """Standard output (and error's terminal-ness) as ``mode`` asks, restored after, and
    the library's progress lines on it (none under ``--quiet``)."""
    if mode == "text":
        with progress_lines(sys.stdout):
            yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout = _JsonLines(out) if mode == "json" else io.StringIO()
    sys.stderr = _NoTerminal(err)
    try:
        with progress_lines(sys.stdout) if mode == "json" else contextlib.nullcontext():
            yield
    finally:
        sys.stdout.flush()
        sys.stdout, sys.stderr = out, err
