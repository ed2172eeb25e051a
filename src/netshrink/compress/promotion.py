"""Promotion orders of the halving search: Pareto fronts, and the reach of rung 0."""

from __future__ import annotations

from collections.abc import Callable

from netshrink.compress.search import Trial


def pareto_order(trials: list[Trial], key: Callable[[Trial], float]) -> list[Trial]:
    """``trials`` front by front (non-dominated sorting on top-1, higher better, and
    ``key``, lower better), each front by ``key``."""
    rest, order = list(trials), []
    while rest:
        front = [t for t in rest if not any(
            o.top1 >= t.top1 and key(o) <= key(t) and (o.top1 > t.top1 or key(o) < key(t))
            for o in rest if o is not t)]
        order += sorted(front, key=key)
        rest = [t for t in rest if t not in front]
    return order


def with_reach(ranked: list[Trial], done: list[Trial], reach_points: float,
               key: Callable[[Trial], float]) -> list[Trial]:
    """``ranked`` with the smallest (fastest, by ``key``) of ``done`` that lost at most
    ``reach_points`` second in line (after the hedge), if it is not already ahead.

    The most pruned structures lose the most in a quarter epoch and recover the most
    from longer fine-tuning, so rung 0 judges them by their worst: d4-ch0.7 (6.5x the
    dense INT8 model's batch-32 throughput, untrained) lost 7.06 points at rung 0
    against 6 admitted and was never trained further.
    """
    reach = [t for t in done if t.drop_points <= reach_points]
    if not reach:
        return ranked
    bold = min(reach, key=key)
    if bold in ranked[:2]:
        return ranked
    rest = [t for t in ranked if t is not bold]
    return [*rest[:1], bold, *rest[1:]]
