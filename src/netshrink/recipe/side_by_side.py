"""The run's files timed side by side at its end: where its speed ratios come from.

Each stage is timed right after it is made, minutes apart from the others; a load that
is steady during one stage's timing and gone during another's passes every noise rule
and still moves their ratio (the quickstart's headline read 22.7x and 3.8x on two runs of
the same recipe). So at the end of a run every stage's file that was timed on the CPU is
opened again where it was measured and timed round-robin in this one process: in each
round every file gets its batch-1 and batch-N timing in turn, after a short warm-up, so a
change of load hits them all alike. The record keeps each file's rounds, a CPU-load
reading before and after, and the machine; the verdicts and the headline take their
ratios from it, and the per-stage timings stay in the table as what they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from pathlib import Path

import torch

from netshrink.bench.environment import environment
from netshrink.bench.load import cpu_load
from netshrink.bench.schema import Latency
from netshrink.bench.timing import combine_rounds, time_model, warm_up, without_common_drift
from netshrink.errors import UserError
from netshrink.recipe.run_folder import now
from netshrink.stages.record import RunRecord, SideBySide, SideBySideTiming, StageRecord

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

__all__ = ["SIDE_BY_SIDE_ROUNDS", "time_side_by_side"]

SIDE_BY_SIDE_ROUNDS = 5  # as the compress search's final re-timing
WARM_S = 0.2  # a session called again after others ran is slow for a while (timing.warm_up)
LATENCY_SECONDS = 0.3  # of batch-1 calls a round, at least LATENCY_CALLS calls
BATCH_SECONDS = 0.3  # of batch-N calls a round, at least BATCH_CALLS calls
LATENCY_WARMUP, LATENCY_CALLS = 5, 20
BATCH_WARMUP, BATCH_CALLS = 1, 3
PROGRESS_EVERY_S = 30.0
RUNTIMES = ("torch", "onnxruntime", "openvino")


def _eligible(record: RunRecord, out: Path, only: Collection[str] | None = None
              ) -> list[StageRecord]:
    """The stages whose file can be timed again as it was measured: timed on the CPU,
    with a file that exists, in a runtime the file opens in as it is (a torch stage
    prepared otherwise, ``runtime_options``, is left to its own timing)."""
    found = []
    for stage in record.stages:
        if only is not None and stage.name not in only:
            continue
        m = stage.measurement
        if (stage.status != "done" or m is None or m.latency is None or not stage.artifact
                or m.environment.device != "cpu" or m.runtime not in RUNTIMES
                or m.runtime_options):
            continue
        if (out / stage.artifact).is_file():
            found.append(stage)
    return found


def time_side_by_side(record: RunRecord, out: Path, *, threads: int, batch: int,
                      rounds: int | None = None, only: Collection[str] | None = None,
                      log: Callable[[str], None] = LOG.info) -> SideBySide | None:
    """Time every eligible stage's file of ``record`` (in run folder ``out``) side by
    side, ``rounds`` (``SIDE_BY_SIDE_ROUNDS``) rounds round-robin, at batch 1 and
    ``batch``; ``only``: of these stages alone. None when fewer than two can be.

    A file that no longer opens (moved, damaged) is left out with a line in the log: the
    run's own stages are done, and the table keeps their timings.
    """
    from netshrink.runtime.files import open_model_file

    rounds = rounds or SIDE_BY_SIDE_ROUNDS
    stages = _eligible(record, out, only)
    if len(stages) < 2:
        return None
    opened, kept = [], []
    try:
        for stage in stages:
            m = stage.measurement
            assert m is not None and stage.artifact is not None
            try:
                model = open_model_file(out / stage.artifact, threads=threads,
                                        runtime=None if m.runtime == "torch" else m.runtime)
            except UserError as exc:
                log(f"side by side: {stage.name} left out ({exc})")
                continue
            if model.runtime != m.runtime:
                model.close()
                continue
            opened.append(model)
            kept.append(stage)
        if len(kept) < 2:
            return None
        return _time(kept, opened, threads=threads, batch=batch, rounds=rounds, log=log)
    finally:
        for model in opened:
            model.close()


def _time(stages: list[StageRecord], opened: list, *, threads: int, batch: int,
          rounds: int, log: Callable[[str], None]) -> SideBySide:
    log(f"side by side: timing {len(stages)} stages' files round-robin, {rounds} rounds, "
        f"batch 1 and {batch}, {threads} threads (the figures the ratios come from)")
    before = cpu_load(threads)
    ones: list[list[Latency]] = [[] for _ in stages]
    many: list[list[Latency]] = [[] for _ in stages]
    started = last = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(1, *s.measurement.input_shape, generator=gen),  # type: ignore[union-attr]
               torch.randn(batch, *s.measurement.input_shape, generator=gen))  # type: ignore[union-attr]
              for s in stages]
    for r in range(rounds):
        for k, (model, (one, full)) in enumerate(zip(opened, inputs, strict=True)):
            warm_up(model.module, one, WARM_S)
            ones[k].append(time_model(model.module, one, warmup=LATENCY_WARMUP, runs=LATENCY_CALLS,
                                      min_seconds=LATENCY_SECONDS, threads=threads, rounds=1))
            many[k].append(time_model(model.module, full, warmup=BATCH_WARMUP, runs=BATCH_CALLS,
                                      min_seconds=BATCH_SECONDS, threads=threads, rounds=1))
            if time.perf_counter() - last >= PROGRESS_EVERY_S:
                last = time.perf_counter()
                per_file = (last - started) / (r * len(stages) + k + 1)
                left = per_file * ((rounds - r) * len(stages) - k - 1)
                log(f"side by side: round {r + 1} of {rounds}, {k + 1} of {len(stages)} "
                    f"files; about {left:.0f} s left")
    after = cpu_load(threads)
    # each round's drift common to all the files divided out (timing.without_common_drift)
    ones, many = without_common_drift(ones), without_common_drift(many)
    timings = [SideBySideTiming(stage=s.name, key=s.key, runtime=s.measurement.runtime,  # type: ignore[union-attr]
                                latency=combine_rounds(one), throughput=combine_rounds(full))
               for s, one, full in zip(stages, ones, many, strict=True)]
    for t in timings:
        log(f"  {t.stage} ({t.runtime}): p50 {t.latency.p50_ms:.3f} ms, batch {batch} "
            f"{t.throughput.images_per_s:,.0f} img/s"  # type: ignore[union-attr]
            + (f" ({t.latency.noise or t.throughput.noise})"  # type: ignore[union-attr]
               if t.latency.noisy or t.throughput.noisy else ""))  # type: ignore[union-attr]
    return SideBySide(timed=now(), rounds=rounds, threads=threads,
                      cpu=environment(device="cpu", threads=threads, seed=0).cpu,
                      load_before=before, load_after=after, stages=timings)
