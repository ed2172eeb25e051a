"""A short reading of how loaded the CPU is, taken with each timing.

A fixed matrix product, timed on as many threads as the timing uses, slows by as much as
the model would when another process holds a core: on 2 cores a busy loop in another
process roughly doubles both. The load average says the same over the last minute.
Two timings whose readings differ by more than ``LOAD_RATIO`` were not taken under the
same conditions, however steady each looks on its own.
"""

from __future__ import annotations

import os
import time

import torch

from netshrink.bench.schema import CpuLoad
from netshrink.bench.timing import num_threads

__all__ = ["CALIBRATION_SIZE", "LOAD_RATIO", "cpu_load", "load_differs"]

CALIBRATION_SIZE = 384  # about 1 ms a product on 2 cores of the machines here
CALIBRATION_CALLS = 40  # about 40 ms on 2 quiet cores
# Calibration times this far apart mean another load: a quiet machine repeats its
# mean within about 10%; a core taken by another process doubles it.
LOAD_RATIO = 1.3


def cpu_load(threads: int) -> CpuLoad:
    """The reading now: load average and the calibration product's mean time on
    ``threads`` threads (a few tens of milliseconds)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(CALIBRATION_SIZE, CALIBRATION_SIZE, generator=gen)
    with num_threads(threads), torch.inference_mode():
        for _ in range(3):
            torch.mm(a, a)  # first calls pay for thread start and allocation
        began = time.perf_counter()
        for _ in range(CALIBRATION_CALLS):
            torch.mm(a, a)
        # the mean over tens of milliseconds, not a median of calls: the scheduler shares
        # a core in slices of a few milliseconds, and a median of sub-millisecond calls
        # fell inside the slices this process had (2 busy loops on 2 cores moved it 4%)
        mean_ms = (time.perf_counter() - began) * 1000 / CALIBRATION_CALLS
    try:
        load_avg: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every OS
        load_avg = None
    return CpuLoad(load_avg=load_avg, calibration_ms=mean_ms, threads=threads)


def load_differs(stage: CpuLoad | None, reference: CpuLoad | None) -> str | None:
    """Why ``stage``'s timing was taken under another load than ``reference``'s, in
    words; None when they agree or either is unknown."""
    if stage is None or reference is None or stage.threads != reference.threads:
        return None
    ratio = stage.calibration_ms / reference.calibration_ms
    if 1 / LOAD_RATIO < ratio < LOAD_RATIO:
        return None
    heavier = "more" if ratio > 1 else "less"
    return (f"timed under {heavier} CPU load than the reference (calibration "
            f"{stage.calibration_ms:.2f} ms against {reference.calibration_ms:.2f} ms)")
