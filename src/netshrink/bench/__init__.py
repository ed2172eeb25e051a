"""Honest measurements: what a model costs (size, MACs, time, memory) and what it gets right.

Public API::

    measure(model, input_shape=[3, 32, 32], data=test, options=MeasureOptions(...))
        -> Measurement
    environment(device="cpu", threads=2, seed=0) -> Environment
    count_params(model) -> (params, nonzero_params)
    count_macs(model, [C, H, W]) -> int
    time_model(fn, example, warmup=10, runs=20, min_seconds=2.0) -> Latency  (3 rounds;
        .round_spread, .noisy and .noise say whether it can be compared)
    peak_memory(fn, example) -> (MiB, "rss" | "cuda")
    evaluate(model, split, batch_size=256) -> Accuracy
"""

from netshrink.bench.accuracy import evaluate
from netshrink.bench.environment import environment
from netshrink.bench.measure import artifact_size, measure
from netshrink.bench.memory import peak_memory
from netshrink.bench.options import MeasureConfig, MeasureOptions
from netshrink.bench.schema import Accuracy, Environment, Latency, Measurement
from netshrink.bench.timing import latency_from_times, num_threads, time_model
from netshrink.models.counting import count_macs, count_params

__all__ = [
    "Accuracy",
    "Environment",
    "Latency",
    "MeasureConfig",
    "MeasureOptions",
    "Measurement",
    "artifact_size",
    "count_macs",
    "count_params",
    "environment",
    "evaluate",
    "latency_from_times",
    "measure",
    "num_threads",
    "peak_memory",
    "time_model",
]
