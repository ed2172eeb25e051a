"""Each stage against the reference: ratios, accuracy change and a plain-words verdict.

The reference is the stage the recipe's ``report.baseline`` names, by default the first
evaluated stage (:func:`reference_stage`). The thresholds are deliberately small but
non-zero: a 1% size change is file-format noise and a 3% latency change is within
run-to-run timing noise on a shared CPU, so neither may be called "smaller" or "faster".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from netshrink.bench.schema import Measurement
from netshrink.errors import UserError
from netshrink.recipe.record import RunRecord, StageRecord

SMALLER_MIN_RATIO = 1.02  # reference size / stage size: at least ~2% smaller
FASTER_MIN_SPEEDUP = 1.05  # reference p50 / stage p50: at least ~5% lower latency

# The note the runner gives a fresh init it only counted and sized (no accuracy, no speed).
UNTRAINED_NOTE = "a fresh, untrained model"
REFERENCE_VERDICT = "reference"


def thresholds_text(reference: str) -> str:
    """The verdict thresholds in words, against the reference stage named ``reference``."""
    return (
        f'Verdict thresholds: "smaller" needs {reference} size / stage size ≥ '
        f"{SMALLER_MIN_RATIO:.2f} (at least ~2% smaller on disk); \"faster\" needs "
        f"{reference} batch-1 p50 latency / stage p50 ≥ {FASTER_MIN_SPEEDUP:.2f} (at least "
        '~5% lower); "accuracy below budget" means top-1 fell by more than the recipe\'s '
        f"report.accuracy_budget (points) below {reference}. Speed is compared only between "
        "measurements on the same device (CPU or GPU)."
    )


@dataclass(frozen=True)
class Comparison:
    """One stage relative to the reference; ``None`` where either side was not measured."""

    size_ratio: float | None  # reference / stage: > 1 means smaller
    speedup: float | None  # reference p50 / stage p50: > 1 means faster; same device only
    throughput_ratio: float | None  # stage img/s / reference img/s, same batch and device
    top1_delta: float | None  # stage - reference, percentage points
    verdict: str
    memory_ratio: float | None = None  # reference peak / stage peak, same kind of peak only


@dataclass(frozen=True)
class Reference:
    """The stage every row is compared with: where it stands in the ordered stages, and a
    note saying which stage it is and why."""

    position: int  # index into the stages ordered by their ``index``
    stage: StageRecord
    note: str


def _report_section(record: RunRecord) -> dict[str, Any]:
    section: Any = record.recipe.get("report") or {}
    if not isinstance(section, dict):
        raise UserError(f"recipe of run {record.name!r}: `report` must be a mapping")
    return section


def accuracy_budget(record: RunRecord) -> float | None:
    """The recipe's ``report.accuracy_budget`` (points of top-1 one may lose), if any."""
    budget = _report_section(record).get("accuracy_budget")
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
        raise UserError(
            f"recipe of run {record.name!r}: report.accuracy_budget must be a number of "
            f"top-1 points ≥ 0, got {budget!r}"
        )
    return float(budget)


def _measured(stage: StageRecord) -> bool:
    return stage.status == "done" and stage.measurement is not None


def _evaluated(stage: StageRecord) -> bool:
    m = stage.measurement
    return stage.status == "done" and m is not None and m.accuracy is not None


def _default_reference(stages: Sequence[StageRecord]) -> tuple[int, str]:
    """The first evaluated stage (the baseline unless it is an untrained start), and why."""
    position = next((i for i, s in enumerate(stages) if _evaluated(s)), None)
    if position is None:
        position = next((i for i, s in enumerate(stages) if _measured(s)), 0)
        return position, f"{stages[position].name} (no stage has a measured accuracy yet)"
    if position == 0:
        return 0, f"{stages[0].name}, the model the recipe starts from"
    skipped = ", ".join(s.name for s in stages[:position])
    return position, (f"{stages[position].name}, the first stage with a measured accuracy "
                      f"({skipped} not evaluated)")


def reference_stage(record: RunRecord, stages: Sequence[StageRecord]) -> Reference | None:
    """The stage the report compares every row with (None when there are no stages).

    The recipe's ``report.baseline`` names it; by default (or while the named stage has
    no measurement, e.g. a run in progress) it is the first stage with a measured
    accuracy: the baseline, or the trained model of a recipe that starts from a fresh
    init. ``stages`` are the run's stages ordered by index.

    Raises:
        UserError: ``report.baseline`` is not a stage name (a hand-edited ``run.json``).
    """
    if not stages:
        return None
    wanted = _report_section(record).get("baseline")
    if wanted is not None and not isinstance(wanted, str):
        raise UserError(f"recipe of run {record.name!r}: report.baseline must be a stage "
                        f"name, got {wanted!r}")
    if wanted is not None:
        named = next((i for i, s in enumerate(stages) if s.name == wanted), None)
        if named is not None and _measured(stages[named]):
            note = (f"Reference: {wanted} (recipe `report.baseline`); every ratio, top-1 "
                    "change and verdict is against it.")
            if not _evaluated(stages[named]):
                note += (" It has no measured accuracy, so no top-1 change or accuracy "
                         "budget can be judged.")
            return Reference(named, stages[named], note)
    position, chosen = _default_reference(stages)
    if wanted is not None:
        note = (f"Reference: recipe `report.baseline` names {wanted}, which has no "
                "measurement yet (the run is in progress, or that stage failed), so the "
                f"report compares with {chosen} instead.")
    else:
        note = (f"Reference: {chosen}; every ratio, top-1 change and verdict is against "
                "it (recipe `report.baseline` picks another stage).")
    return Reference(position, stages[position], note)


def _not_evaluated(stage: StageRecord) -> Comparison:
    """A stage before the reference that was only counted and sized: nothing to compare."""
    untrained = any(note.startswith(UNTRAINED_NOTE) for note in stage.notes)
    verdict = "untrained start (not evaluated)" if untrained else "not evaluated"
    return Comparison(None, None, None, None, verdict)


def compare_all(
    stages: Sequence[StageRecord], reference: Reference | None, budget: float | None
) -> list[Comparison]:
    """Every stage against the reference, in order.

    A stage before the reference with no accuracy (the fresh init a recipe trains) gets
    no ratios: its row shows what was measured and says it was not evaluated.
    """
    if reference is None:
        return []
    return [
        _not_evaluated(s) if i < reference.position and _measured(s) and not _evaluated(s)
        else compare(s, reference.stage, budget)
        for i, s in enumerate(stages)
    ]


def _div(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0 or not math.isfinite(num / den):
        return None
    return num / den


def measurement_on(stage: StageRecord, device: str) -> Measurement | None:
    """The stage's timing on ``device``: its measurement, or the CPU timing a GPU recipe
    with ``measure.also_cpu`` adds to its torch stages; None if it has none there."""
    m = stage.measurement
    if m is not None and m.environment.device == device:
        return m
    return stage.cpu_measurement if device == "cpu" else None


def speed_ratios(m: Measurement | None, b: Measurement | None
                 ) -> tuple[float | None, float | None]:
    """(latency speedup b/m, throughput ratio m/b) of two timings on one device."""
    if m is None or b is None:
        return None, None
    speedup = _div(b.latency.p50_ms, m.latency.p50_ms) if m.latency and b.latency else None
    # img/s at different batch sizes measures different things; no ratio then.
    ratio = None
    if m.throughput and b.throughput and m.throughput.batch_size == b.throughput.batch_size:
        ratio = _div(m.throughput.images_per_s, b.throughput.images_per_s)
    return speedup, ratio


def compare(stage: StageRecord, reference: StageRecord, budget: float | None) -> Comparison:
    """Compare ``stage`` with ``reference`` (which itself gets the verdict "reference")."""
    m, b = stage.measurement, reference.measurement
    size_ratio = speedup = throughput_ratio = top1_delta = memory_ratio = None
    other_device = False
    if m is not None and b is not None:
        size_ratio = _div(b.size_bytes, m.size_bytes)
        # A GPU time against a CPU time says nothing about the compression (ONNX Runtime
        # stages of a CUDA run are timed on the CPU): speed is compared on one device only,
        # against the reference's timing there if it has one (``measure.also_cpu``).
        same_device = measurement_on(reference, m.environment.device)
        other_device = same_device is None
        speedup, throughput_ratio = speed_ratios(m, same_device)
        # Only the CUDA allocator's peak belongs to the model's calls. A CPU figure is the
        # whole process's RSS, which also holds whatever earlier stages of the run left
        # (a teacher, a dataset): a ratio of two such figures would be about the process.
        if m.memory_kind == "cuda" and b.memory_kind == "cuda":
            memory_ratio = _div(b.peak_memory_mb, m.peak_memory_mb)
        if m.accuracy and b.accuracy:
            top1_delta = (m.accuracy.top1 - b.accuracy.top1) * 100

    if stage is reference:
        verdict = REFERENCE_VERDICT
    elif stage.status == "failed":
        verdict = "failed"
    elif m is None:
        verdict = "not measured"
    else:
        parts = [
            "size unknown"
            if size_ratio is None
            else ("smaller" if size_ratio >= SMALLER_MIN_RATIO else "not smaller"),
            _speed_word(speedup, other_device and m.latency is not None),
        ]
        if budget is not None:
            if top1_delta is None:
                parts.append("accuracy unknown")
            # The epsilon keeps float noise (0.70 - 0.71 = -1.0000000000000009) from
            # failing a stage that lost exactly the budget.
            elif -top1_delta > budget + 1e-9:
                parts.append("accuracy below budget")
            else:
                parts.append("accuracy within budget")
        verdict = ", ".join(parts)
    return Comparison(size_ratio, speedup, throughput_ratio, top1_delta, verdict, memory_ratio)


def _speed_word(speedup: float | None, other_device: bool) -> str:
    if other_device:
        return "speed not comparable (other device)"
    if speedup is None:
        return "latency unknown"
    return "faster" if speedup >= FASTER_MIN_SPEEDUP else "not faster"
