"""How a model is measured: one options object for ``measure``, and the recipe's
``measure:`` section that makes one."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from netshrink.limits import MAX_SEED

__all__ = ["MeasureConfig", "MeasureOptions"]

# Defaults sized so ResNet-18 (CIFAR stem, 32x32) measures in about 10-20 s on 2 busy
# cores: batch-1 calls take ~20-50 ms there and batch-32 calls ~1 s, so latency gets
# 10 warm-up calls and 2 s of samples (>= 20), throughput 2 warm-up calls and >= 5 samples.
# A faster model gets more samples from the same ``min_seconds``; a slower one
# (ResNet-50 at 224) stops at the minimum counts.
DEFAULT_WARMUP = 10
DEFAULT_LATENCY_RUNS = 20
DEFAULT_THROUGHPUT_WARMUP = 2
DEFAULT_THROUGHPUT_RUNS = 5
DEFAULT_MIN_SECONDS = 2.0


class MeasureOptions(BaseModel):
    """How ``measure`` measures (what is measured, the model and its files, are its
    arguments).

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        threads: intra-op threads of the timed runs (torch's, or a runtime session's);
            None: the caller's, ``torch.get_num_threads()`` as ``measure`` is called (or
            the count a runtime's session was opened with). A number is set for the
            measurement only: torch's count is restored after.
        seed: seed of the random inputs.
        batch_size: batch size of the throughput measurement.
        eval_batch_size: batch size for accuracy; defaults to ``batch_size``.
        max_eval_images: evaluate only the first this many images; None for all.
        latency: time latency and throughput; False leaves both None (a quick
            measurement of size, counts and accuracy only).
        memory: measure peak memory.
        warmup: untimed calls before latency timing.
        latency_runs: the least number of timed batch-1 calls.
        throughput_warmup: untimed calls before throughput timing.
        throughput_runs: the least number of timed batch-``batch_size`` calls.
        min_seconds: time each of latency and throughput for at least this long; None
            for exactly ``*_runs`` calls.
        noisy_retries: time a noisy latency or throughput again up to this many times and
            keep the steadier (a load change on a shared VM lands in one timing, seldom
            in the next); 0: one timing, noisy or not. Each retry costs ``min_seconds``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    device: str = "cpu"
    # None, not a number: a library must not override the thread count its caller chose
    # (torch.set_num_threads, OMP_NUM_THREADS); the count used is recorded either way.
    threads: int | None = Field(default=None, gt=0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    batch_size: int = Field(default=32, gt=0)
    eval_batch_size: int | None = Field(default=None, gt=0)
    max_eval_images: int | None = Field(default=None, gt=0)
    latency: bool = True
    memory: bool = True
    warmup: int = Field(default=DEFAULT_WARMUP, ge=0)
    latency_runs: int = Field(default=DEFAULT_LATENCY_RUNS, gt=0)
    throughput_warmup: int = Field(default=DEFAULT_THROUGHPUT_WARMUP, ge=0)
    throughput_runs: int = Field(default=DEFAULT_THROUGHPUT_RUNS, gt=0)
    min_seconds: float | None = Field(default=DEFAULT_MIN_SECONDS, ge=0)
    noisy_retries: int = Field(default=1, ge=0)


class MeasureConfig(BaseModel):
    """The ``measure:`` section of a recipe: how each stage's model is measured."""

    model_config = ConfigDict(extra="forbid")

    split: Literal["test", "val"] = "test"
    max_eval_images: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=32, gt=0)
    # A recipe states its thread count (2 unless written): its stages, resumed runs and
    # cached baselines are compared with each other, so they must not follow whatever
    # the shell running it happens to set.
    threads: int = Field(default=2, gt=0)
    latency: bool = True  # time batch-1 latency and batch-N throughput
    # In a GPU recipe, also time every torch stage on the CPU (no accuracy: same weights),
    # so that the stages CPU runtimes run (ONNX Runtime INT8) get speed ratios too.
    also_cpu: bool = False

    def options(self, *, device: str, seed: int, eval_batch_size: int | None = None
                ) -> MeasureOptions:
        """The ``MeasureOptions`` this section asks for on ``device``."""
        return MeasureOptions(device=device, threads=self.threads, seed=seed,
                              batch_size=self.batch_size, eval_batch_size=eval_batch_size,
                              max_eval_images=self.max_eval_images, latency=self.latency)
