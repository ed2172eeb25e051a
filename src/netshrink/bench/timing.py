"""Time a model's forward pass the same way for every model and runtime.

Every call is timed on its own and the record keeps percentiles, not only a mean: on a
shared 2-core machine one descheduling adds tens of milliseconds to one call, and the
median stays honest where the mean does not.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from netshrink.bench._common import resolve_device
from netshrink.bench.schema import Latency
from netshrink.errors import UserError

__all__ = ["DEFAULT_MAX_RUNS", "latency_from_times", "num_threads", "time_model"]

# Upper bound on timed calls when ``min_seconds`` keeps asking for more: a model taking
# 50 µs per call would otherwise need 40,000 calls to fill 2 s, for no better estimate.
DEFAULT_MAX_RUNS = 10_000


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads, then restore the old count.

    ``None`` leaves the count as it is.

    Raises:
        UserError: ``threads`` is below 1.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise UserError(f"threads must be at least 1, not {threads}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def _no_gc() -> Iterator[None]:
    # A garbage collection landing inside one timed call would add its pause to that call
    # alone; collect before the timed loop and keep the collector off during it.
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def latency_from_times(
    times_ms: list[float] | np.ndarray, *, batch_size: int, warmup: int
) -> Latency:
    """Summarise per-call wall times into a ``Latency`` record.

    Args:
        times_ms: one wall time per timed call, in milliseconds.
        batch_size: images per call.
        warmup: untimed calls made before these.

    Returns:
        The record, with ``images_per_s = batch_size / p50``.

    Raises:
        ValueError: ``times_ms`` is empty.
    """
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timed calls to summarise")
    p50, p90 = np.percentile(t, [50, 90])
    return Latency(
        batch_size=batch_size,
        runs=int(t.size),
        warmup=warmup,
        p50_ms=float(p50),
        p90_ms=float(p90),
        mean_ms=float(t.mean()),
        min_ms=float(t.min()),
        max_ms=float(t.max()),
        # Sample standard deviation: the runs are a sample of the calls the model could make.
        std_ms=float(t.std(ddof=1)) if t.size > 1 else 0.0,
        images_per_s=float(batch_size / (p50 / 1000.0)) if p50 > 0 else float("inf"),
    )


def time_model(
    fn: Callable[[Tensor], object],
    example: Tensor,
    *,
    warmup: int,
    runs: int,
    min_seconds: float | None = None,
    max_runs: int = DEFAULT_MAX_RUNS,
    device: str | torch.device | None = None,
    threads: int | None = None,
) -> Latency:
    """Time ``fn(example)`` call by call.

    ``warmup`` untimed calls come first (they pay for lazy initialisation, allocator
    growth and oneDNN/cuDNN kernel selection). Then at least ``runs`` calls are timed; with
    ``min_seconds``, timing goes on until that many seconds have passed since the first
    timed call, up to ``max_runs`` calls, so a fast model gets many samples and a slow one
    still finishes. Everything runs under ``torch.inference_mode`` with the garbage
    collector paused.

    On CPU each call is timed with ``time.perf_counter``. On CUDA each call is bracketed
    by CUDA events and synchronised, so the time is that of the GPU work and not of the
    asynchronous launch.

    Args:
        fn: the call to time, e.g. a model or an onnxruntime session wrapper.
        example: its input; ``example.shape[0]`` is the batch size.
        warmup: untimed calls first.
        runs: the least number of timed calls.
        min_seconds: keep timing until this many seconds of timed calls; None for none.
        max_runs: never time more calls than this.
        device: where ``fn`` runs; defaults to ``example.device``.
        threads: torch intra-op threads during timing (restored after); None keeps them.

    Returns:
        A ``Latency`` with p50/p90/mean/min/max/std in milliseconds and images per second.

    Raises:
        UserError: a count is out of range, or the device is not available.
    """
    if warmup < 0:
        raise UserError(f"warmup must be 0 or more, not {warmup}")
    if runs < 1:
        raise UserError(f"runs must be at least 1, not {runs}")
    if max_runs < runs:
        raise UserError(f"max_runs ({max_runs}) must be at least runs ({runs})")
    if min_seconds is not None and min_seconds < 0:
        raise UserError(f"min_seconds must be 0 or more, not {min_seconds}")
    dev = resolve_device(device if device is not None else example.device)
    batch_size = int(example.shape[0]) if example.ndim > 0 else 1
    budget = min_seconds or 0.0

    times_ms: list[float] = []
    with num_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            fn(example)
        if dev.type == "cuda":
            with torch.cuda.device(dev):
                torch.cuda.synchronize()
                with _no_gc():
                    started = time.perf_counter()
                    while len(times_ms) < runs or (
                        time.perf_counter() - started < budget and len(times_ms) < max_runs
                    ):
                        begin = torch.cuda.Event(enable_timing=True)
                        end = torch.cuda.Event(enable_timing=True)
                        begin.record()
                        fn(example)
                        end.record()
                        end.synchronize()
                        times_ms.append(begin.elapsed_time(end))
        else:
            with _no_gc():
                started = time.perf_counter()
                while len(times_ms) < runs or (
                    time.perf_counter() - started < budget and len(times_ms) < max_runs
                ):
                    t0 = time.perf_counter()
                    fn(example)
                    times_ms.append((time.perf_counter() - t0) * 1000.0)
    return latency_from_times(times_ms, batch_size=batch_size, warmup=warmup)
