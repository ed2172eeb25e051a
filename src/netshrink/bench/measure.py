"""Measure one model once: size, parameters, MACs, latency, throughput, memory, accuracy.

Every comparison in a report (baseline vs pruned vs quantized) is between two
``Measurement`` records made by this one function, so they are taken the same way.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from netshrink.bench._common import PRECISIONS, input_dtype, resolve_device
from netshrink.bench.accuracy import evaluate
from netshrink.bench.environment import environment
from netshrink.bench.load import cpu_load
from netshrink.bench.memory import peak_memory
from netshrink.bench.options import MeasureOptions
from netshrink.bench.schema import Accuracy, Latency, Measurement
from netshrink.bench.timing import num_threads
from netshrink.bench.timing import time_model as _time_model
from netshrink.data.base import Split
from netshrink.errors import UserError
from netshrink.models.counting import check_input_shape, count_macs, count_params
from netshrink.models.footprint import check_activation, input_bytes, meta_forward
from netshrink.runtime.base import Executable
from netshrink.runtime.torch_exec import cuda_flags

__all__ = ["artifact_size", "file_size", "measure", "measure_threads"]

def artifact_size(file: Path) -> int:
    """Bytes a saved model takes on disk: the file's size, or the sum over a directory.

    A directory covers formats saved as several files (an OpenVINO ``.xml`` + ``.bin``,
    an ONNX model with external data); an OpenVINO IR named by its ``.xml`` counts the
    ``.bin`` of its weights beside it too (the ``.xml`` alone is the graph).

    Raises:
        UserError: ``file`` does not exist.
    """
    if file.is_dir():
        return sum(p.stat().st_size for p in file.rglob("*") if p.is_file())
    if not file.is_file():
        raise UserError(f"model file {str(file)!r} does not exist; save the model first")
    weights = file.with_suffix(".bin")
    if file.suffix.lower() == ".xml" and weights.is_file():
        return file.stat().st_size + weights.stat().st_size
    return file.stat().st_size


def file_size(file: Path | str | None, run_dir: Path | str | None
               ) -> tuple[str | None, int | None]:
    """``file`` as recorded (relative to ``run_dir``) and its size; None, None for none."""
    if file is None:
        return None, None
    path = Path(file)
    size = artifact_size(path)
    if run_dir is None:
        return path.as_posix(), size
    # relpath rather than Path.relative_to: a file outside the run dir still gets a path
    # that resolves from the run dir ("../export/model.onnx").
    return Path(os.path.relpath(path.resolve(), Path(run_dir).resolve())).as_posix(), size


def _timings(work: nn.Module, one: torch.Tensor, batch: torch.Tensor, opts: MeasureOptions,
             dev: torch.device) -> tuple[Latency | None, Latency | None]:
    """Batch-1 latency and batch-N throughput timings, or None, None when not asked."""
    if not opts.latency:
        return None, None
    latency = steadiest(lambda: _time_model(
        work, one, warmup=opts.warmup, runs=opts.latency_runs, min_seconds=opts.min_seconds,
        device=dev), opts.noisy_retries)
    throughput = steadiest(lambda: _time_model(
        work, batch, warmup=opts.throughput_warmup, runs=opts.throughput_runs,
        min_seconds=opts.min_seconds, device=dev), opts.noisy_retries)
    return latency, throughput


def steadiest(time_once: Callable[[], Latency], retries: int) -> Latency:
    """``time_once()``, timed again while noisy (up to ``retries`` more times); the
    steadiest of the timings made, with how many there were."""
    best, attempts = time_once(), 1
    while best.noisy and attempts <= retries:
        again = time_once()
        attempts += 1
        if again.unsteadiness < best.unsteadiness:
            best = again
    return best.model_copy(update={"attempts": attempts})


def activation_bytes(model: nn.Module, shape: list[int]) -> int:
    """Bytes of activations one ``shape`` image makes ``model`` hold at once, its input
    included, known before measuring allocates any (``models.footprint``).

    A torch model runs on the ``meta`` device; a runtime's session carries what its file
    said (``activation_bytes``, set by ``runtime.files``). Where neither tells (a model
    with ops that have no meta kernel), the input is what is known.
    """
    known = input_bytes(shape)
    if isinstance(model, Executable):
        return max(known, getattr(model, "activation_bytes", None) or 0)
    try:
        return max(known, meta_forward(model, shape)[0])
    except Exception:  # the caller's own model: measuring will show it
        return known


def measure_threads(model: nn.Module, asked: int | None) -> int:
    """The intra-op thread count a measurement of ``model`` runs with and records:
    ``asked`` when given; else, for a runtime's session, the count it was opened with
    (a session's threads are fixed when it is made); else the caller's torch count.

    Raises:
        UserError: ``asked`` is not the count ``model``'s session was opened with (the
            measurement would record a count the runtime never used).
    """
    own = model.threads if isinstance(model, Executable) else None
    if asked is not None and own is not None and own != asked:
        raise UserError(f"the {model.runtime} session was opened with {own} threads, not "
                        f"the {asked} the measurement asks for: open it with "
                        f"threads={asked}, or leave MeasureOptions.threads unset")
    if asked is not None:
        return asked
    return own if own is not None else torch.get_num_threads()


def measure(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    data: Split | None = None,
    split_name: str = "test",
    file: Path | str | None = None,
    run_dir: Path | str | None = None,
    sizes: dict[str, int] | None = None,
    precision: str | None = None,
    options: MeasureOptions | None = None,
) -> Measurement:
    """Measure a PyTorch model (or an ``Executable``: a runtime's session, a compiled model).

    The caller's model is never changed: a deep copy is put in eval mode and moved to the
    device, and everything runs on the copy. The random inputs come from a private
    generator seeded with ``options.seed``, so torch's global RNG is left alone too.
    Everything runs with ``options.threads`` torch intra-op threads when it is given, and
    the caller's count is restored after; left None, the caller's current count is used
    and nothing is changed. The count recorded (``environment.threads``) is the one the
    model ran with: for a runtime's session, the count it was opened with
    (``measure_threads``).

    Steps: parameter counts, MACs for one image, latency at batch 1, throughput at batch
    ``options.batch_size`` (both after untimed warm-up calls, with at least the asked
    number of timed ones, extended to ``min_seconds`` each), peak memory over two more
    calls, then accuracy when ``data`` is given. Latency and throughput are each timed in
    three back-to-back rounds sharing those calls and seconds; each records its rounds'
    medians and spread, and is marked ``noisy`` (with why) when p90/p50 or that spread
    passes its threshold (``bench.schema.NOISY_*``).

    Args:
        model: the model; inputs are cast to the dtype of its parameters.
        input_shape: one image, ``[C, H, W]``.
        data: labelled images for accuracy; None to skip accuracy.
        split_name: the split name recorded with the accuracy.
        file: the saved model whose size on disk is recorded; None to record no size.
        run_dir: the run directory; ``file`` is recorded relative to it.
        sizes: bytes of other files of the same model worth comparing (the packed file,
            the float file it came from), by role.
        precision: the precision to record when the inputs' dtype does not tell it
            (an fp16 file computed in fp32 on a CPU).
        options: how to measure (device, threads, batch sizes, what to time); defaults.

    An ``Executable``'s counts come from the torch model it was made from.

    Returns:
        A ``Measurement``. ``macs`` is None when torch's counter counted nothing (e.g.
        quantized kernels it has no formula for).

    Raises:
        UserError: a bad shape, device or missing ``file``; or a model whose activations
            at ``options.batch_size`` (or the accuracy batch) would take more than
            ``models.footprint`` allows, refused before any input is made.
    """
    opts = options or MeasureOptions()
    shape = check_input_shape(input_shape)
    batches = [opts.batch_size] + ([opts.eval_batch_size or opts.batch_size] if data else [])
    check_activation(activation_bytes(model, shape), max(batches),
                     str(file) if file is not None else f"{type(model).__name__} model")
    threads = measure_threads(model, opts.threads)
    env = environment(device=opts.device, threads=threads, seed=opts.seed)
    dev = resolve_device(opts.device)
    rel_file, size_bytes = file_size(file, run_dir)

    runtime, runtime_options = "torch", None
    if isinstance(model, Executable):
        params, nonzero = model.stats.params, model.stats.nonzero_params
        runtime, precision = model.runtime, precision or model.precision
        runtime_options = model.options
    else:
        params, nonzero = count_params(model)

    # Work on a copy: moving, eval() or a forward with hooks must not reach the caller's
    # model, and the copy can be dropped whole afterwards.
    work = copy.deepcopy(model).eval().to(dev)
    dtype = input_dtype(work)
    gen = torch.Generator().manual_seed(opts.seed)
    one = torch.randn(1, *shape, generator=gen).to(dev, dtype=dtype)
    batch = torch.randn(opts.batch_size, *shape, generator=gen).to(dev, dtype=dtype)

    accuracy: Accuracy | None = None
    peak_mb: float | None = None
    memory_kind: str | None = None
    # A plain torch model on a GPU runs as its label says: fp32 without TF32, with cuDNN's
    # autotuning (a prepared Executable sets its own flags on every call).
    flags = (cuda_flags(dev, "fp32") if dev.type == "cuda" and not isinstance(model, Executable)
             else contextlib.nullcontext())
    # Only an asked count is set (and undone after); None leaves the caller's own alone.
    with num_threads(opts.threads), flags:
        macs = (model.stats.macs if isinstance(model, Executable)
                else count_macs(work, shape) or None)
        # the CPU load read beside the timings: a load steady through one stage's timing
        # and gone by another's passes the noise rules (netshrink.bench.load)
        load = cpu_load(threads) if opts.latency and dev.type == "cpu" else None
        latency, throughput = _timings(work, one, batch, opts, dev)
        if opts.memory and getattr(work, "memory_visible", True):
            peak_mb, memory_kind = peak_memory(work, batch, calls=2, device=dev)
        if data is not None:
            accuracy = evaluate(work, data, batch_size=opts.eval_batch_size or opts.batch_size,
                                device=dev, max_images=opts.max_eval_images,
                                split_name=split_name)
    del work

    return Measurement(
        runtime=runtime,
        precision=precision or PRECISIONS.get(dtype, str(dtype).removeprefix("torch.")),
        runtime_options=runtime_options or None,
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
        load=load,
    )
