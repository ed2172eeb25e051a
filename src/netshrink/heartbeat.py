"""A line at least every ``HEARTBEAT_SECONDS`` while a long step has no progress of its own.

Training says where it is (a bar on a terminal, lines in a log file), and so do the
latency table and the side-by-side timing; exporting, quantizing with NNCF, opening a
runtime or timing one file can each take minutes and say nothing meanwhile. Wrapped in
``heartbeat("step")``, such a step logs ``step: still running, 90 s`` whenever nothing
was logged for ``HEARTBEAT_SECONDS`` (any record of a ``netshrink`` logger, or a progress
bar's step: ``mark_progress``), so that a silent minute is never mistaken for a hang.
Nested heartbeats in one thread: only the innermost, which names the step best, beats.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["HEARTBEAT_SECONDS", "heartbeat", "mark_progress", "marking"]

HEARTBEAT_SECONDS = 30.0  # the bound: progress at least every 30 s in every step

_LOG = logging.getLogger(__name__)
_last_progress = time.monotonic()
_lock = threading.Lock()
_beating: dict[int, list[_Beat]] = {}  # thread id -> its heartbeats, innermost last


def mark_progress() -> None:
    """Something showed progress just now: the heartbeats wait a full interval again."""
    global _last_progress
    _last_progress = time.monotonic()


def marking(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` that also counts as progress: a caller's own sink keeps the heartbeats
    quiet while it gets lines. A logger's method is returned as it is: its records
    count by themselves, and name the module that wrote them (``%(module)s``)."""
    if isinstance(getattr(log, "__self__", None), logging.Logger):
        return log

    def log_and_mark(line: str) -> None:
        mark_progress()
        log(line)

    return log_and_mark


class _ProgressSeen(logging.Handler):
    """On the ``netshrink`` logger: every record that reaches it is progress shown."""

    def emit(self, record: logging.LogRecord) -> None:
        mark_progress()


_package = logging.getLogger("netshrink")
if not any(isinstance(h, _ProgressSeen) for h in _package.handlers):
    _package.addHandler(_ProgressSeen())


class _Beat(threading.Thread):
    """The daemon thread of one ``heartbeat`` (a daemon: it never holds a process open)."""

    def __init__(self, step: str, log: Callable[[str], None], interval: float) -> None:
        super().__init__(name=f"netshrink heartbeat: {step}", daemon=True)
        self.step, self.log, self.interval = step, log, interval
        self.owner = threading.get_ident()
        self.started = time.monotonic()
        self.stopped = threading.Event()

    def innermost(self) -> bool:
        with _lock:
            own = _beating.get(self.owner, [])
            return bool(own) and own[-1] is self

    def run(self) -> None:
        # Woken when a line is due, not polled: a timing that runs meanwhile is not
        # interrupted more than once an interval.
        while True:
            due = max(_last_progress, self.started) + self.interval
            if self.stopped.wait(max(0.0, due - time.monotonic())):
                return
            now = time.monotonic()
            if now < max(_last_progress, self.started) + self.interval:
                continue  # progress came meanwhile: wait from there
            if not self.innermost():  # the inner step beats, naming itself
                if self.stopped.wait(self.interval):
                    return
                continue
            mark_progress()  # also when ``log`` is a caller's own sink, not a logger
            self.log(f"{self.step}: still running, {now - self.started:.0f} s")


@contextlib.contextmanager
def heartbeat(step: str, log: Callable[[str], None] | None = None, *,
              interval: float | None = None) -> Iterator[None]:
    """Within the block, log ``step: still running, N s`` through ``log`` (default: this
    module's logger, INFO) whenever nothing showed progress for ``interval`` seconds
    (``HEARTBEAT_SECONDS``, read when the block starts)."""
    beat = _Beat(step, log or _LOG.info, interval or HEARTBEAT_SECONDS)
    with _lock:
        _beating.setdefault(beat.owner, []).append(beat)
    beat.start()
    try:
        yield
    finally:
        beat.stopped.set()
        with _lock:
            own = _beating[beat.owner]
            own.remove(beat)
            if not own:
                del _beating[beat.owner]
        beat.join(timeout=1.0)
