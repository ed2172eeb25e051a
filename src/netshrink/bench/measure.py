"""Measure one model once: size, parameters, MACs, latency, throughput, memory, accuracy.

Every comparison in a report (baseline vs pruned vs quantized) is between two
``Measurement`` records made by this one function, so they are taken the same way.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from netshrink.bench._common import PRECISIONS, input_dtype, resolve_device
from netshrink.bench.accuracy import evaluate
from netshrink.bench.environment import environment
from netshrink.bench.memory import peak_memory
from netshrink.bench.schema import Accuracy, Latency, Measurement
from netshrink.bench.timing import num_threads
from netshrink.bench.timing import time_model as _time_model
from netshrink.data.base import Split
from netshrink.errors import UserError
from netshrink.models.counting import check_input_shape, count_macs, count_params
from netshrink.runtime.base import Executable
from netshrink.runtime.torch_exec import cuda_flags

__all__ = ["artifact_size", "measure"]

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


def artifact_size(file: Path) -> int:
    """Bytes a saved model takes on disk: the file's size, or the sum over a directory.

    A directory covers formats saved as several files (an OpenVINO ``.xml`` + ``.bin``,
    an ONNX model with external data).

    Raises:
        UserError: ``file`` does not exist.
    """
    if file.is_dir():
        return sum(p.stat().st_size for p in file.rglob("*") if p.is_file())
    if not file.is_file():
        raise UserError(f"model file {str(file)!r} does not exist; save the model first")
    return file.stat().st_size


def measure(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    data_split: Split | None = None,
    file: Path | str | None = None,
    run_dir: Path | str | None = None,
    device: str = "cpu",
    threads: int = 2,
    seed: int = 0,
    batch_size: int = 32,
    warmup: int = DEFAULT_WARMUP,
    latency_runs: int = DEFAULT_LATENCY_RUNS,
    throughput_warmup: int = DEFAULT_THROUGHPUT_WARMUP,
    throughput_runs: int = DEFAULT_THROUGHPUT_RUNS,
    min_seconds: float | None = DEFAULT_MIN_SECONDS,
    time_model: bool = True,
    memory: bool = True,
    accuracy_split_name: str = "test",
    max_eval_images: int | None = None,
    eval_batch_size: int | None = None,
    sizes: dict[str, int] | None = None,
    precision: str | None = None,
) -> Measurement:
    """Measure a PyTorch model.

    The caller's model is never changed: a deep copy is put in eval mode and moved to
    ``device``, and everything runs on the copy. The random inputs come from a private
    generator seeded with ``seed``, so torch's global RNG is left alone too. Everything
    runs with ``threads`` torch intra-op threads; the old count is restored after.

    Steps: parameter counts, MACs for one image, latency at batch 1, throughput at batch
    ``batch_size`` (both with ``warmup`` untimed calls and at least ``*_runs`` timed ones,
    extended to ``min_seconds`` each), peak memory over two more batch-``batch_size``
    calls, then accuracy when ``data_split`` is given. Latency and throughput are each
    timed in three back-to-back rounds sharing those calls and seconds; each records its
    rounds' medians and spread, and is marked ``noisy`` (with why) when p90/p50 or that
    spread passes its threshold (``bench.schema.NOISY_*``).

    Args:
        model: the model; inputs are cast to the dtype of its parameters.
        input_shape: one image, ``[C, H, W]``.
        data_split: labelled images for accuracy; None to skip accuracy.
        file: the saved model whose size on disk is recorded; None to record no size.
        run_dir: the run directory; ``file`` is recorded relative to it.
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch intra-op threads.
        seed: seed of the random inputs.
        batch_size: batch size of the throughput measurement.
        warmup: untimed calls before latency timing.
        latency_runs: the least number of timed batch-1 calls.
        throughput_warmup: untimed calls before throughput timing.
        throughput_runs: the least number of timed batch-``batch_size`` calls.
        min_seconds: time each of latency and throughput for at least this long; None
            for exactly ``*_runs`` calls.
        time_model: time latency and throughput; False leaves both None (a quick
            measurement of size, counts and accuracy only).
        memory: measure peak memory.
        accuracy_split_name: the split name recorded with the accuracy.
        max_eval_images: evaluate only the first this many images; None for all.
        eval_batch_size: batch size for accuracy; defaults to ``batch_size``.
        sizes: bytes of other files of the same model worth comparing (the packed file,
            the float file it came from), by role.
        precision: the precision to record when the inputs' dtype does not tell it
            (an fp16 file computed in fp32 on a CPU).

    An ``Executable`` (an ONNX Runtime or OpenVINO session, a compiled torch model) is
    measured by the same code; its counts come from the torch model it was made from.

    Returns:
        A ``Measurement``. ``macs`` is None when torch's counter counted nothing (e.g.
        quantized kernels it has no formula for).

    Raises:
        UserError: a bad shape, count, device or missing ``file``.
    """
    shape = check_input_shape(input_shape)
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    env = environment(device=device, threads=threads, seed=seed)
    dev = resolve_device(device)

    rel_file: str | None = None
    size_bytes: int | None = None
    if file is not None:
        path = Path(file)
        size_bytes = artifact_size(path)
        rel_file = path.as_posix()
        if run_dir is not None:
            # relpath rather than Path.relative_to: a file outside the run dir still gets a
            # path that resolves from the run dir ("../export/model.onnx").
            rel_file = Path(os.path.relpath(path.resolve(), Path(run_dir).resolve())).as_posix()

    runtime = "torch"
    options = None
    if isinstance(model, Executable):
        params, nonzero = model.stats.params, model.stats.nonzero_params
        runtime, precision = model.runtime, precision or model.precision
        options = model.options
    else:
        params, nonzero = count_params(model)

    # Work on a copy: moving, eval() or a forward with hooks must not reach the caller's
    # model, and the copy can be dropped whole afterwards.
    work = copy.deepcopy(model).eval().to(dev)
    dtype = input_dtype(work)
    gen = torch.Generator().manual_seed(seed)
    one = torch.randn(1, *shape, generator=gen).to(dev, dtype=dtype)
    batch = torch.randn(batch_size, *shape, generator=gen).to(dev, dtype=dtype)

    accuracy: Accuracy | None = None
    latency: Latency | None = None
    throughput: Latency | None = None
    peak_mb: float | None = None
    memory_kind: str | None = None
    # A plain torch model on a GPU runs as its label says: fp32 without TF32, with cuDNN's
    # autotuning (a prepared Executable sets its own flags on every call).
    flags = (cuda_flags(dev, "fp32") if dev.type == "cuda" and not isinstance(model, Executable)
             else contextlib.nullcontext())
    with num_threads(threads), flags:
        macs = (model.stats.macs if isinstance(model, Executable)
                else count_macs(work, shape) or None)
        if time_model:
            latency = _time_model(
                work, one, warmup=warmup, runs=latency_runs, min_seconds=min_seconds, device=dev
            )
            throughput = _time_model(
                work,
                batch,
                warmup=throughput_warmup,
                runs=throughput_runs,
                min_seconds=min_seconds,
                device=dev,
            )
        if memory and getattr(work, "memory_visible", True):
            peak_mb, memory_kind = peak_memory(work, batch, calls=2, device=dev)
        if data_split is not None:
            accuracy = evaluate(
                work,
                data_split,
                batch_size=eval_batch_size or batch_size,
                device=dev,
                max_images=max_eval_images,
                split_name=accuracy_split_name,
            )
    del work

    return Measurement(
        runtime=runtime,
        precision=precision or PRECISIONS.get(dtype, str(dtype).removeprefix("torch.")),
        runtime_options=options or None,
        input_shape=shape,
        file=rel_file,
        size_bytes=size_bytes,
        sizes=sizes,
        params=params,
        nonzero_params=nonzero,
        macs=macs,
        latency=latency,
        throughput=throughput,
        peak_memory_mb=peak_mb,
        memory_kind=memory_kind,
        accuracy=accuracy,
        environment=env,
    )
