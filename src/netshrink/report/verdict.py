"""Each stage against the baseline: ratios, accuracy change and a plain-words verdict.

The thresholds are deliberately small but non-zero: a 1% size change is file-format
noise and a 3% latency change is within run-to-run timing noise on a shared CPU, so
neither may be called "smaller" or "faster".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from netshrink.errors import UserError
from netshrink.recipe.record import RunRecord, StageRecord

SMALLER_MIN_RATIO = 1.02  # baseline size / stage size: at least ~2% smaller
FASTER_MIN_SPEEDUP = 1.05  # baseline p50 / stage p50: at least ~5% lower latency

THRESHOLDS_TEXT = (
    f'Verdict thresholds: "smaller" needs baseline size / stage size ≥ '
    f'{SMALLER_MIN_RATIO:.2f} (at least ~2% smaller on disk); "faster" needs baseline '
    f"batch-1 p50 latency / stage p50 ≥ {FASTER_MIN_SPEEDUP:.2f} (at least ~5% lower); "
    '"accuracy below budget" means top-1 fell by more than the recipe\'s '
    "report.accuracy_budget (points) below the baseline. Speed is compared only between "
    "measurements on the same device (CPU or GPU)."
)


@dataclass(frozen=True)
class Comparison:
    """One stage relative to the baseline; ``None`` where either side was not measured."""

    size_ratio: float | None  # baseline / stage: > 1 means smaller
    speedup: float | None  # baseline p50 / stage p50: > 1 means faster; same device only
    throughput_ratio: float | None  # stage img/s / baseline img/s, same batch and device
    top1_delta: float | None  # stage - baseline, percentage points
    verdict: str
    memory_ratio: float | None = None  # baseline peak / stage peak, same kind of peak only


def accuracy_budget(record: RunRecord) -> float | None:
    """The recipe's ``report.accuracy_budget`` (points of top-1 one may lose), if any."""
    section: Any = record.recipe.get("report") or {}
    if not isinstance(section, dict):
        raise UserError(f"recipe of run {record.name!r}: `report` must be a mapping")
    budget = section.get("accuracy_budget")
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
        raise UserError(
            f"recipe of run {record.name!r}: report.accuracy_budget must be a number of "
            f"top-1 points ≥ 0, got {budget!r}"
        )
    return float(budget)


def _div(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0 or not math.isfinite(num / den):
        return None
    return num / den


def compare(stage: StageRecord, baseline: StageRecord, budget: float | None) -> Comparison:
    """Compare ``stage`` with ``baseline`` (``baseline`` itself gets verdict "baseline")."""
    m, b = stage.measurement, baseline.measurement
    size_ratio = speedup = throughput_ratio = top1_delta = memory_ratio = None
    other_device = False
    if m is not None and b is not None:
        size_ratio = _div(b.size_bytes, m.size_bytes)
        # A GPU time against a CPU time says nothing about the compression (ONNX Runtime
        # stages of a CUDA run are timed on the CPU): speed is compared on one device only.
        other_device = m.environment.device != b.environment.device
        if m.latency and b.latency and not other_device:
            speedup = _div(b.latency.p50_ms, m.latency.p50_ms)
        # img/s at different batch sizes measures different things; no ratio then.
        if (m.throughput and b.throughput and not other_device
                and m.throughput.batch_size == b.throughput.batch_size):
            throughput_ratio = _div(m.throughput.images_per_s, b.throughput.images_per_s)
        if m.memory_kind is not None and m.memory_kind == b.memory_kind:
            memory_ratio = _div(b.peak_memory_mb, m.peak_memory_mb)
        if m.accuracy and b.accuracy:
            top1_delta = (m.accuracy.top1 - b.accuracy.top1) * 100

    if stage is baseline:
        verdict = "baseline"
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
