"""A compress folder's ``side_by_side.json``: the pick and the reference (the input
model) timed side by side at the end of the search, where the report's speed ratio of
the pick comes from (issue 28), in the format a study's report reads.

Once chosen, the pick is run again in ``chosen/`` with the test split measured, and that
run ends, as every run does, by timing its files round-robin in one process
(``netshrink.recipe.side_by_side``): the input model's file and the pick's among them, in
the runtimes and threads the candidates were measured in, with a CPU-load reading before
and after. Its stages have the candidates' stage keys (the same models), so those timings
are taken as they are, under the names the search's report gives the two, and not timed
a third time. Only where that run holds no timing of both are the two files in ``cells/``
timed side by side here.

The search's own re-timing before it chose (``Search.retime``: the candidates within the
budget, batch 1) times no reference, so it gives no ratio against one; it stays what
the choice was made on.

A resumed search makes the file again at its end (the ``chosen/`` run times its files
again whenever it runs), so its figures are of one process, one machine and one load; a
search that chose nothing removes an older file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from netshrink.report.verdict import reference_stage
from netshrink.stages.record import SideBySide, StageRecord
from netshrink.study.report import final_stage_of, read_combined
from netshrink.study.side_by_side import (
    side_by_side_p50s,
    time_stages_side_by_side,
    write_side_by_side,
)

__all__ = ["PickSpeed", "time_pick_side_by_side"]


@dataclass(frozen=True)
class PickSpeed:
    """The pick's batch-1 speed against the reference, both timed side by side."""

    reference_ms: float  # batch-1 p50
    pick_ms: float
    reference_runtime: str
    pick_runtime: str

    @property
    def ratio(self) -> float:
        return self.reference_ms / self.pick_ms


def time_pick_side_by_side(out: Path, chosen: str | None, run_timing: SideBySide | None,
                           log: Callable[[str], None]) -> PickSpeed | None:
    """Write ``out/side_by_side.json`` for the search in ``out`` whose pick is the cell
    ``chosen`` (None: no pick; an older file is removed), from ``run_timing`` (the
    ``chosen/`` run's) where it timed both files, else timed here. The pick's speed
    against the reference; None where not timed both, or not steadily."""
    timing = reference = pick = None
    if chosen is not None:
        combined = read_combined(out, chosen=chosen)
        found = reference_stage(combined.record, list(combined.record.stages))
        reference = found.stage if found is not None else None
        pick = final_stage_of(combined.record, combined.rows, chosen)
        if reference is not None and pick is not None:
            timing = _as_named(run_timing, [reference, pick])
            if timing is None and _timed(reference) and _timed(pick):
                log("compress: timing the pick and the input model side by side")
                timing = time_stages_side_by_side(combined.record, out, [reference, pick],
                                                  log)
    write_side_by_side(out, timing)
    if timing is None or reference is None or pick is None:
        return None
    p50s = side_by_side_p50s(timing, reference, pick)
    if p50s is None:
        return None
    ref_m, pick_m = reference.measurement, pick.measurement
    assert ref_m is not None and pick_m is not None  # timed, so measured
    return PickSpeed(*p50s, reference_runtime=ref_m.runtime, pick_runtime=pick_m.runtime)


def _timed(stage: StageRecord) -> bool:
    """Whether ``stage`` was timed when measured (not with timing off)."""
    return stage.measurement is not None and stage.measurement.latency is not None


def _as_named(timing: SideBySide | None, stages: list[StageRecord]) -> SideBySide | None:
    """``timing``'s entries of ``stages`` (found by stage key and runtime: the same
    model in the same runtime), renamed as ``stages`` are; None unless it holds all."""
    if timing is None:
        return None
    entries = []
    for stage in stages:
        m = stage.measurement
        entry = next((t for t in timing.stages if t.key == stage.key and m is not None
                      and t.runtime == m.runtime), None)
        if entry is None:
            return None
        entries.append(entry.model_copy(update={"stage": stage.name}))
    return timing.model_copy(update={"stages": entries})
