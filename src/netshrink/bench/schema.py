"""The records every measurement and every run is written as (``run.json``).

The report is rendered from these records alone, so every field a table or plot shows
must be here, with the hardware, versions, threads and seed it was measured under.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Environment(BaseModel):
    """Where a measurement was taken."""

    model_config = ConfigDict(extra="forbid")

    cpu: str  # model name, e.g. "AMD EPYC 9R14 (2 cores, avx512_vnni, avx512_bf16)"
    cores: int  # logical cores the process may use
    gpu: str | None = None  # e.g. "NVIDIA H100 80GB HBM3"; None when measured on CPU
    device: str = "cpu"  # "cpu" or "cuda"
    threads: int  # torch intra-op threads during timing
    seed: int
    python: str
    versions: dict[str, str]  # torch, netshrink, numpy, onnxruntime, ... (those installed)
    platform: str


class Latency(BaseModel):
    """Per-call wall time over ``runs`` timed calls after ``warmup`` untimed ones."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int
    runs: int
    warmup: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    images_per_s: float  # batch_size / (p50_ms / 1000)


class Accuracy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: str  # "test", "val", ...
    images: int
    top1: float  # fraction in [0, 1]
    top5: float
    loss: float | None = None


class Measurement(BaseModel):
    """What one model is, measured once. Fields are None when not measured."""

    model_config = ConfigDict(extra="forbid")

    runtime: str = "torch"  # which runtime ran the timing: torch, onnxruntime, openvino, ...
    precision: str = "fp32"
    # How the runtime was prepared (torch: channels_last, compile mode, 2:4 kernels), as
    # the options it reopens with; None: as loaded.
    runtime_options: dict[str, Any] | None = None
    input_shape: list[int]  # one image, [C, H, W]
    file: str | None = None  # the saved artifact the size is of (relative to the run)
    size_bytes: int | None = None
    sizes: dict[str, int] | None = None  # other files of the same model, by role (packed, ...)
    params: int
    nonzero_params: int
    macs: int | None = None  # multiply-accumulates for one image
    latency: Latency | None = None  # batch 1
    throughput: Latency | None = None  # batch N
    peak_memory_mb: float | None = None
    memory_kind: str | None = None  # "rss" (process peak, CPU) or "cuda" (peak reserved)
    accuracy: Accuracy | None = None
    environment: Environment
