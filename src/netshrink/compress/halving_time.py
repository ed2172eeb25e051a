"""The halving search's time: the cost of a candidate of each rung, learnt from this
call's own candidates, the ``--time-budget`` that stops starting ones that would end past
it, and the estimate of the time left in the progress lines."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netshrink.compress.search import Trial


class TimeBudget:
    """Mixed into ``HalvingSearch``: what it reads of the search is ``cfg`` (``rungs``,
    ``eta``, ``time_budget_s``), ``started``, ``stopped_by_time``, ``_trials_seen``,
    ``log`` and ``notes``."""

    cfg: Any
    started: float
    stopped_by_time: bool
    _trials_seen: list[Trial]
    notes: list[str]
    log: Callable[[str], None]

    def _cost(self, rung: int) -> float | None:
        """Seconds one candidate of ``rung`` is expected to take, from those run in
        this call (fine-tuning time grows with the rung's epochs)."""
        ran = [t for t in self._trials_seen if t.seconds > 0 and t.candidate.rung is not None
               and t.candidate.rung >= 0 and t.candidate.pruned]
        if not ran:
            return None
        per_epoch = statistics.median(
            t.seconds / (self.cfg.rungs[t.candidate.rung] + 0.1) for t in ran)
        return per_epoch * (self.cfg.rungs[min(rung, len(self.cfg.rungs) - 1)] + 0.1)

    def _out_of_time(self, rung: int) -> bool:
        budget = self.cfg.time_budget_s
        if budget is None:
            return False
        cost = self._cost(rung) or 0.0
        if time.perf_counter() - self.started + cost <= budget:
            return False
        if not self.stopped_by_time:
            self.stopped_by_time = True
            self.log(f"compress: the time budget ({budget / 60:.0f} min) would be passed by "
                     f"the next candidate (about {cost / 60:.1f} min): choosing from what "
                     "was found")
            self.notes.append(
                f"stopped by the time budget ({budget / 60:.0f} min) during rung {rung}")
        return True

    def _affordable(self, rung: int, quota: int) -> int:
        """``quota`` cut to what the time budget leaves for ``rung`` (at least one)."""
        budget, cost = self.cfg.time_budget_s, self._cost(rung)
        if budget is None or not cost:
            return quota
        left = budget - (time.perf_counter() - self.started)
        return max(1, min(quota, int(left // cost)))

    def _progress(self, rung: int, left_in_rung: int) -> str:
        elapsed = time.perf_counter() - self.started
        eta = ""
        cost = self._cost(rung)
        if cost:
            rest, n = left_in_rung * cost, len(self._at(rung)) + left_in_rung
            for later in range(rung + 1, len(self.cfg.rungs)):
                n = min(n, max(2, math.ceil(n / self.cfg.eta)))
                rest += n * (self._cost(later) or 0.0)
            left = "under a minute" if rest < 60 else f"about {rest / 60:.0f} min"
            eta = f"; {left} left (from this call's fine-tuning speed)"
        return f"compress: {elapsed / 60:.1f} min in{eta}"

    def _at(self, rung: int) -> list[Trial]:
        return [t for t in self._trials_seen if t.candidate.rung == rung]

