"""A pruning stage that measured slower than the model it pruned says so in its record.

Channel pruning removes multiply-accumulates, but a runtime's kernels want channel counts
in multiples of their vector block: a model pruned to other widths can run slower than
the original (torchvision's MobileNetV3-small pruned unrounded ran at 0.60x in ONNX
Runtime). ``round_to: auto`` avoids most of it; where a pruned stage still measures
slower than its input, on the same device and in the same runtime, with both timings
steady (the report's own judgement), the stage gets a note naming the figure and what
to try, and the run's log says it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from netshrink.stages.record import StageRecord

__all__ = ["PRUNING_KINDS", "note_if_slower", "slower_note"]

PRUNING_KINDS = ("prune.channel", "prune.blocks")


def slower_note(stage: StageRecord, before: StageRecord) -> str | None:
    """The note for a pruning ``stage`` judged slower than ``before`` (its input); None
    when it is not, or the two were not timed alike (other device or runtime, a noisy
    or missing timing)."""
    from netshrink.report.verdict import SLOWER, judge_speed, runtime_name

    m, b = stage.measurement, before.measurement
    if (stage.kind not in PRUNING_KINDS or m is None or b is None or m.latency is None
            or b.latency is None or m.environment.device != b.environment.device
            or runtime_name(m) != runtime_name(b)):
        return None
    judged = judge_speed(m, b, names=(stage.name, before.name))
    if judged.word != SLOWER or not judged.speedup:
        return None
    return (f"slower than its input {before.name}: batch-1 latency {1 / judged.speedup:.2f}x "
            f"the input's in {runtime_name(m)}; {_hint(stage.kind, stage.config)}")


def _hint(kind: str, config: dict[str, Any]) -> str:
    if kind != "prune.channel":
        return "the layers removed saved less than the rest now costs"
    if config.get("round_to") in (None, 1):
        return ("its channel counts are unrounded: round_to: auto (the default) keeps them "
                "multiples of 8, which CPU kernels need")
    return ("try round_to: 16 (the kernels' block on AVX-512 CPUs), or a smaller ratio: "
            "at this size per-layer overhead, not arithmetic, sets the time")


def note_if_slower(stage: StageRecord, stages: Sequence[StageRecord], source: str | None,
                   log: Callable[[str], None]) -> None:
    """Add ``slower_note`` to ``stage`` against its input stage ``source`` (by name, among
    the finished ``stages``), and log it."""
    before = next((s for s in stages if s.name == source), None)
    note = slower_note(stage, before) if before is not None else None
    if note is not None:
        stage.notes.append(note)
        log(f"[{stage.index}] {stage.name}: {note}")
