"""``side_by_side.json`` of a study's (or a compress search's) folder: its files timed
side by side, round-robin, in one process at its end, where the report's speed ratios
come from (issue 28; ``netshrink.recipe.side_by_side`` times them).

The file holds one timing, of one machine under one load: it is written whole or not at
all, and a timing that cannot be taken again removes the one before it, so a report
never states a ratio of files timed on two machines or under two loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from netshrink.errors import UserError
from netshrink.limits import read_regular
from netshrink.stages.record import RunRecord, SideBySide, StageRecord
from netshrink.study.results import is_file

__all__ = ["SIDE_BY_SIDE_FILE", "read_side_by_side", "side_by_side_p50s",
           "steady_p50", "time_stages_side_by_side", "write_side_by_side"]

SIDE_BY_SIDE_FILE = "side_by_side.json"  # the cells' files timed side by side at the end
MAX_SIDE_BY_SIDE_BYTES = 16 << 20  # a few hundred bytes a cell


def read_side_by_side(out: Path) -> SideBySide | None:
    """``out/side_by_side.json``, or None where it was not timed (an older study, timing
    off, an interrupted one).

    Raises:
        UserError: a file there that is not a side-by-side timing netshrink wrote.
    """
    path = Path(out) / SIDE_BY_SIDE_FILE
    if not is_file(path):
        return None
    what = "side-by-side timing record"
    data = read_regular(path, what, max_bytes=MAX_SIDE_BY_SIDE_BYTES)  # a FIFO, a huge file
    try:
        return SideBySide.model_validate_json(data)
    except ValidationError as exc:
        raise UserError(f"{path}: not a side-by-side timing netshrink wrote "
                        f"({exc.errors()[0]['msg']}); move it away and run the study (or the "
                        "search) again to time its files again") from None


def write_side_by_side(out: Path, timing: SideBySide | None) -> None:
    """Write ``timing`` as ``out/side_by_side.json``; None removes the file there (a
    timing of other files, or of another machine, must not stand for this one)."""
    from netshrink.store.atomic import atomic_write_text
    from netshrink.store.walls import remove_file

    path = Path(out) / SIDE_BY_SIDE_FILE
    if timing is None:
        remove_file(path)
    else:
        atomic_write_text(path, timing.model_dump_json(indent=1))


def time_stages_side_by_side(record: RunRecord, out: Path, stages: Sequence[StageRecord],
                             log: Callable[[str], None]) -> SideBySide | None:
    """The files of ``stages`` (of ``record``, a combined record of the folder ``out``;
    the first is the reference) timed side by side with the reference's threads and
    batch size; None when fewer than two of them were timed at all."""
    from netshrink.recipe.side_by_side import time_side_by_side

    timed = [s for s in stages if s.measurement is not None
             and s.measurement.latency is not None]
    if len(timed) < 2 or timed[0] is not stages[0]:
        return None
    ref_m = timed[0].measurement
    assert ref_m is not None
    return time_side_by_side(record, Path(out), threads=ref_m.environment.threads,
                             batch=(ref_m.throughput.batch_size if ref_m.throughput else 32),
                             only={s.name for s in timed}, log=log)


def steady_p50(timing: SideBySide | None, stage: StageRecord) -> float | None:
    """``stage``'s batch-1 p50 (ms) in ``timing``; None where it was not timed there, or
    not steadily (a noisy timing states no ratio)."""
    t = timing.of(stage) if timing is not None else None
    return t.latency.p50_ms if t is not None and not t.latency.noisy else None


def side_by_side_p50s(timing: SideBySide | None, reference: StageRecord,
                      stage: StageRecord) -> tuple[float, float] | None:
    """The batch-1 p50s (ms) of ``reference`` and ``stage`` in ``timing``; None unless
    both were timed there steadily."""
    ref, own = steady_p50(timing, reference), steady_p50(timing, stage)
    return (ref, own) if ref and own else None
