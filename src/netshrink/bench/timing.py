"""Time a model's forward pass the same way for every model and runtime.

Every call is timed on its own and the record keeps percentiles, not only a mean: on a
shared 2-core machine one descheduling adds tens of milliseconds to one call, and the
median stays honest where the mean does not.

The median is not enough when the load changes while timing (another job starts): the
calls are made in a few back-to-back rounds sharing the same budget of calls and seconds,
and the record keeps each round's median and how far apart they are. A timing whose
p90/p50 or round spread passes its threshold (``NOISY_P90_OVER_P50``,
``NOISY_ROUND_SPREAD``) is marked ``noisy`` with the reason, and the report refuses to
call it faster or slower.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from netshrink.bench._common import resolve_device
from netshrink.bench.schema import NOISY_P90_OVER_P50, NOISY_ROUND_SPREAD, Latency, noise_reason
from netshrink.errors import UserError

__all__ = [
    "DEFAULT_MAX_RUNS",
    "DEFAULT_ROUNDS",
    "NOISY_P90_OVER_P50",
    "NOISY_ROUND_SPREAD",
    "combine_rounds",
    "latency_from_times",
    "num_threads",
    "time_model",
    "warm_up",
]

# Upper bound on timed calls when ``min_seconds`` keeps asking for more: a model taking
# 50 µs per call would otherwise need 40,000 calls to fill 2 s, for no better estimate.
DEFAULT_MAX_RUNS = 10_000
# Rounds the timed calls are split into: three medians are the fewest whose spread tells a
# load change from one unlucky round; more would leave each round too few calls.
DEFAULT_ROUNDS = 3


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
    # alone; keep the collector off during the timed loop. Before it, only the young
    # generations: they hold the warm-up's garbage, and a full collection of a large
    # process (a test session, a long compress search) took 0.2-0.5 s a timing here.
    was_enabled = gc.isenabled()
    gc.collect(1)
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def latency_from_times(
    times_ms: list[float] | np.ndarray | Sequence[Sequence[float]],
    *,
    batch_size: int,
    warmup: int,
) -> Latency:
    """Summarise per-call wall times into a ``Latency`` record.

    Args:
        times_ms: one wall time per timed call, in milliseconds; or one such list per
            round, to record each round's median and their spread.
        batch_size: images per call.
        warmup: untimed calls made before these.

    Returns:
        The record, with ``images_per_s = batch_size / p50`` and ``noisy`` set (with its
        reason) when p90/p50 or the rounds' spread passes its threshold.

    Raises:
        ValueError: no times, or an empty round.
    """
    if len(times_ms) and not np.isscalar(times_ms[0]):
        rounds = [np.asarray(r, dtype=np.float64) for r in times_ms]  # type: ignore[union-attr]
    else:
        rounds = [np.asarray(times_ms, dtype=np.float64)]
    if any(r.size == 0 for r in rounds):
        raise ValueError("no timed calls to summarise")
    t = np.concatenate(rounds)
    p50, p90 = np.percentile(t, [50, 90])
    medians = [float(np.median(r)) for r in rounds] if len(rounds) > 1 else None
    spread = None
    if medians is not None and min(medians) > 0:
        spread = max(medians) / min(medians) - 1.0
    reason = noise_reason(float(p50), float(p90), spread)
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
        rounds=len(rounds),
        round_p50_ms=medians,
        round_spread=spread,
        noisy=reason is not None,
        noise=reason,
    )


def combine_rounds(rounds: Sequence[Latency]) -> Latency:
    """One ``Latency`` of several timed separately (each a round of a round-robin with
    other models): the median of their p50s and p90s, each one's p50 as a round's median,
    and their spread, judged noisy as one timing's rounds are.

    Raises:
        ValueError: no rounds, or rounds of different batch sizes.
    """
    if not rounds or len({r.batch_size for r in rounds}) != 1:
        raise ValueError("give one or more timings of one batch size")
    p50s = [r.p50_ms for r in rounds]
    p50 = float(np.median(p50s))
    p90 = float(np.median([r.p90_ms for r in rounds]))
    spread = max(p50s) / min(p50s) - 1.0 if len(p50s) > 1 and min(p50s) > 0 else None
    reason = noise_reason(p50, p90, spread)
    runs = sum(r.runs for r in rounds)
    return Latency(
        batch_size=rounds[0].batch_size, runs=runs, warmup=rounds[0].warmup,
        p50_ms=p50, p90_ms=p90, mean_ms=sum(r.mean_ms * r.runs for r in rounds) / runs,
        min_ms=min(r.min_ms for r in rounds), max_ms=max(r.max_ms for r in rounds),
        std_ms=float(np.median([r.std_ms for r in rounds])),
        images_per_s=rounds[0].batch_size / (p50 / 1000.0) if p50 > 0 else float("inf"),
        rounds=len(rounds), round_p50_ms=p50s if len(p50s) > 1 else None,
        round_spread=spread, noisy=reason is not None, noise=reason)


def without_common_drift(files: Sequence[Sequence[Latency]]) -> list[list[Latency]]:
    """Round-robin timings of several files (``files[f][r]``: file f's timing in round r)
    with each round's common drift divided out: the round's factor is the median, over
    the files, of its p50 over that file's median p50.

    A VM's speed drifts between rounds by far more than the files differ (measured here,
    a quiet VM: one file's round medians 19% apart, another's 40%, while the ratio of the
    two moved much less in the rounds it was timed together); a load that slows every file
    of a round alike is not a difference between them. What is left, the spread of each
    file against the others, is what judges its timing noisy (``combine_rounds``), and
    the ratio of two files' medians is then that of their paired rounds.
    """
    medians = [float(np.median([r.p50_ms for r in rounds])) for rounds in files]
    n = min(len(rounds) for rounds in files)
    factors = [float(np.median([rounds[i].p50_ms / m for rounds, m in zip(files, medians,
                                                                            strict=True)
                                if m > 0])) for i in range(n)]
    return [[_scaled(rounds[i], 1 / factors[i]) if factors[i] > 0 else rounds[i]
             for i in range(n)] for rounds in files]


def _scaled(latency: Latency, k: float) -> Latency:
    """``latency`` with every time multiplied by ``k`` (and the rate divided by it)."""
    times = {f: getattr(latency, f) * k for f in ("p50_ms", "p90_ms", "mean_ms", "min_ms",
                                                   "max_ms", "std_ms")}
    rounds = ([x * k for x in latency.round_p50_ms] if latency.round_p50_ms is not None
              else None)
    return latency.model_copy(update={**times, "images_per_s": latency.images_per_s / k,
                                      "round_p50_ms": rounds})


def _split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal whole counts, the larger first: 17, 3 -> 6, 6, 5."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


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
    rounds: int = DEFAULT_ROUNDS,
) -> Latency:
    """Time ``fn(example)`` call by call, in ``rounds`` back-to-back rounds.

    ``warmup`` untimed calls come first (they pay for lazy initialisation, allocator
    growth and oneDNN/cuDNN kernel selection). Then at least ``runs`` calls are timed; with
    ``min_seconds``, timing goes on until that many seconds have passed since the first
    timed call, up to ``max_runs`` calls, so a fast model gets many samples and a slow one
    still finishes. The calls, seconds and cap are shared out between the rounds (17 runs
    in 3 rounds are 6 + 6 + 5), so rounds cost no extra time; there are never more rounds
    than ``runs``. Everything runs under ``torch.inference_mode`` with the garbage
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
        rounds: split the timed calls into this many rounds (1: one block, no spread).

    Returns:
        A ``Latency`` with p50/p90/mean/min/max/std in milliseconds, images per second,
        each round's median, their spread, and whether the timing is noisy.

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
    if rounds < 1:
        raise UserError(f"rounds must be at least 1, not {rounds}")
    dev = resolve_device(device if device is not None else example.device)
    batch_size = int(example.shape[0]) if example.ndim > 0 else 1
    n_rounds = min(rounds, runs)
    budget = (min_seconds or 0.0) / n_rounds
    plan = list(zip(_split(runs, n_rounds), _split(max_runs, n_rounds), strict=True))

    times_ms: list[list[float]] = []
    with num_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            fn(example)
        if dev.type == "cuda":
            with torch.cuda.device(dev):
                torch.cuda.synchronize()
                with _no_gc():
                    for least, most in plan:
                        times = []
                        started = time.perf_counter()
                        while len(times) < least or (
                            time.perf_counter() - started < budget and len(times) < most
                        ):
                            begin = torch.cuda.Event(enable_timing=True)
                            end = torch.cuda.Event(enable_timing=True)
                            begin.record()
                            fn(example)
                            end.record()
                            end.synchronize()
                            times.append(begin.elapsed_time(end))
                        times_ms.append(times)
        else:
            with _no_gc():
                for least, most in plan:
                    times = []
                    started = time.perf_counter()
                    while len(times) < least or (
                        time.perf_counter() - started < budget and len(times) < most
                    ):
                        t0 = time.perf_counter()
                        fn(example)
                        times.append((time.perf_counter() - t0) * 1000.0)
                    times_ms.append(times)
    return latency_from_times(times_ms, batch_size=batch_size, warmup=warmup)


def warm_up(session: Callable[[Tensor], object], one: Tensor, seconds: float) -> None:
    """Call ``session`` on ``one`` for ``seconds``, untimed.

    A session called again after others ran is slow for its first few hundred
    milliseconds on the 2-core VM netshrink is developed on, not only its first few calls
    (ResNet-18 pruned to 0.12 ms at batch 1 in ONNX Runtime timed 0.12-0.25 ms in a
    round-robin with 20 warm-up calls, 0.118-0.131 ms after 0.5 s of calls): a count of
    warm-up calls does not cover it, a time does.
    """
    started = time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - started < seconds:
            session(one)
