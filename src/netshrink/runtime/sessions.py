"""Open an exported model in ONNX Runtime or OpenVINO with a fixed number of threads."""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from netshrink.errors import UserError
from netshrink.limits import clip
from netshrink.registry import Registry
from netshrink.runtime.base import ModelStats, RuntimeModule
from netshrink.store.kinds import (
    DESCRIBED,
    file_kind,
    is_packed,
    locate_model,
    packed_header,
    read_onnx,
)

__all__ = ["RUNTIMES", "load_onnx", "onnx_precision", "open_runtime", "require"]

# The pip extra that installs each optional runtime.
EXTRAS = {"openvino": "openvino", "nncf": "openvino", "tensorrt": "tensorrt"}

RUNTIMES: Registry[Callable[..., RuntimeModule]] = Registry("runtime")


def require(module: str) -> ModuleType:
    """Import an optional package, or fail naming the extra that installs it.

    Raises:
        UserError: the package is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module, module)
        raise UserError(
            f"{module} is not installed; install it with: pip install 'netshrink[{extra}]'"
        ) from None


def load_onnx(path: Path) -> Any:
    """The ``onnx.ModelProto`` of an ONNX file, or of the ONNX model a packed ``.nspk``
    file holds (``store.packed_onnx.pack_onnx``), told by content and read bounded.

    Raises:
        UserError: another kind of file, or an unreadable, damaged or external-data one.
    """
    import onnx

    path, kind = locate_model(path)
    if kind == "onnx":
        return read_onnx(path)
    if kind == "nspk" and packed_header(path).get("kind") == "onnx":
        from netshrink.store.packed_onnx import unpack_onnx

        model = onnx.ModelProto()
        model.ParseFromString(unpack_onnx(path))
        return model
    raise UserError(f"{path}: {DESCRIBED[kind]}, not an ONNX model; give the .onnx file "
                    "netshrink or torch.onnx exported")


def onnx_precision(path: Path | Any) -> str:
    """What an ONNX model (a file, a packed ONNX file, or a ``ModelProto``) computes in:
    int8 (QDQ / integer ops), int8-dynamic, fp16, or fp32."""
    import onnx

    graph = (path if isinstance(path, onnx.ModelProto) else load_onnx(path)).graph
    ops = {node.op_type for node in graph.node}
    if ops & {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}:
        return "int8-dynamic"
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv"}:
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer):
        return "fp16"
    return "fp32"


@contextmanager
def _onnx_file(path: Path) -> Iterator[tuple[Path, Any]]:
    """``(the file a runtime opens, its ModelProto or None)``: the path itself, or for a
    packed ONNX file a temporary copy of the ONNX model it holds (removed once opened:
    both runtimes read the whole model when they load it)."""
    if not is_packed(path):
        yield path, None
        return
    model = load_onnx(path)
    # Named as netshrink's, so that a folder left behind (a killed process) says whose.
    with tempfile.TemporaryDirectory(prefix="netshrink-") as tmp:
        copy = Path(tmp) / "model.onnx"
        copy.write_bytes(model.SerializeToString())
        yield copy, model


def open_runtime(
    path: Path,
    runtime: str,
    *,
    stats: ModelStats,
    threads: int | None = None,
    precision: str | None = None,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Open ``path`` in ``runtime`` ("onnxruntime", "openvino", "torch", "tensorrt") as a
    module.

    Args:
        path: an ``.onnx`` file, or an OpenVINO ``.xml`` (its ``.bin`` beside it).
        runtime: the runtime's name.
        stats: counts of the source torch model, kept for the measurement.
        threads: intra-op threads the runtime may use; None: torch's current count
            (``torch.get_num_threads()``, which follows ``torch.set_num_threads`` and
            ``OMP_NUM_THREADS``), so a session runs with the caller's setting. Fixed
            for the session's life and kept as its ``threads``.
        precision: OpenVINO's inference precision for float layers ("fp32" or "bf16");
            None: fp32, and for ONNX the file's own precision is recorded. For torch:
            "fp16" files compute in fp32 on a CPU (emulated fp16 is several times slower),
            "bf16" files compute in bf16.
        device: where a torch model runs; ONNX Runtime and OpenVINO run on the CPU.
        options: for torch, a ``TorchExecution`` as a dict (fp16 compute, channels_last,
            torch.compile, 2:4 kernels); for tensorrt, the engine's ``opt_batch`` and
            ``max_batch``; the others take none.
        input_shape: one image ``[C, H, W]``; needed by torch ``options`` and tensorrt.

    Raises:
        UserError: an unknown or missing runtime, or a file it cannot read.
    """
    if threads is None:
        threads = torch.get_num_threads()
    if threads < 1:
        raise UserError(f"threads must be at least 1, not {threads}")
    if not path.exists():
        raise UserError(f"{path}: model file not found")
    if path.is_dir():  # OpenVINO IR saved as a folder holding model.xml + model.bin
        path = path / "model.xml"
    extra: dict[str, Any] = {}
    if runtime == "tensorrt":  # the engine's optimization profile needs the image shape
        if input_shape is None:
            raise UserError("a TensorRT engine needs the input shape of one image")
        extra = {"input_shape": input_shape, **(options or {})}  # opt_batch, max_batch
    elif options:
        if runtime != "torch":
            raise UserError(f"runtime {runtime!r} takes no options (got {sorted(options)})")
        extra = {"options": options, "input_shape": input_shape}
    return RUNTIMES.get(runtime)(path, threads=threads, stats=stats, precision=precision,
                                 device=device, **extra)


@RUNTIMES.register("onnxruntime")
def _onnxruntime(path: Path, *, threads: int, stats: ModelStats, precision: str | None,
                 device: str) -> RuntimeModule:
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT would also log each error it raises to stderr; netshrink reports it in one line.
    options.log_severity_level = 4
    errors = ort_errors()
    with _onnx_file(path) as (source, proto):
        try:
            session = ort.InferenceSession(str(source), options,
                                           providers=["CPUExecutionProvider"])
        except errors as exc:  # the file's fault; anything else is ours and stays loud
            raise UserError(f"{path}: ONNX Runtime cannot load it: {_brief(exc)}") from None
        recorded = precision or onnx_precision(proto if proto is not None else path)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return session.run(None, {name: x})[0]
        except errors as exc:  # a graph that loads but cannot run on what it is given
            shape = "x".join(map(str, getattr(x, "shape", ()))) or "scalar"
            raise UserError(f"{path}: ONNX Runtime cannot run it on a {shape} "
                            f"{getattr(x, 'dtype', type(x).__name__)} input: "
                            f"{_brief(exc)}") from None

    return RuntimeModule(run, runtime="onnxruntime", precision=recorded, stats=stats,
                         threads=threads)


def ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception types (``Fail``, ``InvalidArgument``, ``InvalidGraph``,
    ...): what a file it cannot load or run raises. They derive from ``Exception`` alone,
    so catching these leaves every other error visible."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(t for t in vars(state).values()
                 if isinstance(t, type) and issubclass(t, Exception))


def _brief(exc: BaseException) -> str:
    """A runtime's message on one line, short: they run to many lines of C++ context."""
    return clip(str(exc), 300)


def _openvino_error(exc: BaseException) -> bool:
    """Whether ``exc`` is OpenVINO's own (it raises plain ``RuntimeError`` whose text
    starts with where in its C++ sources it failed), not a bug of ours."""
    return isinstance(exc, RuntimeError) and str(exc).startswith("Exception from src")


@RUNTIMES.register("openvino")
def _openvino(path: Path, *, threads: int, stats: ModelStats, precision: str | None,
              device: str) -> RuntimeModule:
    ov = require("openvino")
    # "int8" labels a quantized file; its float parts (if any) still run in f32.
    hint = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "fp16": "f16"}.get(precision or "fp32")
    if hint is None:
        raise UserError(f"OpenVINO precision {precision!r} is not one of fp32, bf16, fp16, int8")
    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": threads,
        # OpenVINO computes float layers in bf16 by default on CPUs that have it;
        # an "fp32" measurement must say f32 or it silently measures bf16.
        "INFERENCE_PRECISION_HINT": hint,
        "PERFORMANCE_HINT": "LATENCY",
    }
    with _onnx_file(path) as (source, proto):
        try:
            model = core.read_model(str(source))
            dynamic = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            raise UserError(f"{path}: OpenVINO cannot load it: "
                            f"{str(exc).splitlines()[0]}") from None
        recorded = precision or "fp32"
        if proto is not None or file_kind(path) == "onnx":  # IR says nothing of its own
            in_file = onnx_precision(proto if proto is not None else path)
            recorded = in_file if in_file.startswith("int8") else recorded
    run = StaticShapes(core, model, config, dynamic.create_infer_request(), path)
    # The count asked, as ONNX Runtime's: OpenVINO itself takes at most the cores there
    # are (3 asked on 2 cores runs 2), and a session is known by the setting it was given.
    return RuntimeModule(run, runtime="openvino", precision=recorded, stats=stats,
                         threads=threads)


class StaticShapes:
    """Runs images in OpenVINO, each input shape in an infer request compiled for it (the
    few most recent shapes kept).

    A model exported with a dynamic batch runs slower in OpenVINO than the same model
    compiled for a fixed shape (shape inference and buffer sizing on every call: ResNet-18
    INT8 at batch 1, 0.20 against 0.175 ms here), and OpenVINO's own advice is to reshape
    to the shape that runs. A file whose input cannot take a shape keeps the dynamic
    request for it.
    """

    KEEP = 4  # shapes kept compiled: measurement uses 2-3 (batch 1, N, a last partial one)

    def __init__(self, core: Any, model: Any, config: dict[str, Any], dynamic: Any,
                 path: Path | None = None) -> None:
        self.core, self.model, self.config, self.dynamic = core, model, config, dynamic
        self.path = path
        self.compiled: dict[tuple[int, ...], Any] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # Shared buffers: OpenVINO's Python call otherwise copies the input and builds a
        # copied result dict, about 50 us a call (a quarter of a small INT8 ResNet-18's
        # batch-1 time here). The shared output is overwritten by the next call: copy it.
        try:
            out = self.get(x.shape).infer({0: x}, share_inputs=True, share_outputs=True)
        except RuntimeError as exc:
            if not _openvino_error(exc):
                raise
            raise UserError(f"{self.path or 'the model'}: OpenVINO cannot run it on a "
                            f"{'x'.join(map(str, x.shape))} input: {_brief(exc)}") from None
        return np.array(next(iter(out.values())), copy=True)

    def get(self, shape: tuple[int, ...]) -> Any:
        request = self.compiled.pop(shape, None)
        if request is None:
            request = self._compile(shape)
            if len(self.compiled) >= self.KEEP:
                self.compiled.pop(next(iter(self.compiled)))  # the least recently used
        self.compiled[shape] = request  # most recent last
        return request

    def _compile(self, shape: tuple[int, ...]) -> Any:
        try:
            model = self.model.clone()
            model.reshape({model.inputs[0].any_name: list(shape)})
            return self.core.compile_model(model, "CPU", self.config).create_infer_request()
        except Exception:  # a fixed or unusual input: the dynamic model takes every shape
            return self.dynamic


@RUNTIMES.register("tensorrt")
def _tensorrt(path: Path, *, threads: int, stats: ModelStats, precision: str | None,
              device: str, input_shape: Sequence[int], opt_batch: int = 64,
              max_batch: int = 256) -> nn.Module:
    from netshrink.runtime.tensorrt_rt import open_tensorrt

    return open_tensorrt(path, stats=stats, precision=precision, device=device,
                         input_shape=input_shape, opt_batch=opt_batch, max_batch=max_batch)


@RUNTIMES.register("torch")
def _torch(path: Path, *, threads: int, stats: ModelStats, precision: str | None,
           device: str, options: dict[str, Any] | None = None,
           input_shape: Sequence[int] | None = None) -> nn.Module:
    if is_packed(path):  # told by content: a .nspk renamed is still one
        from netshrink.store.packed import load_packed_model

        model, _, _ = load_packed_model(path)
    else:
        from netshrink.store.checkpoint import load_model

        model, _, _ = load_model(path)
    if options:
        from netshrink.runtime.torch_exec import TorchExecution, prepare_torch

        if input_shape is None:
            raise UserError("a torch execution needs the input shape of one image")
        return prepare_torch(model, TorchExecution(**options), device=device,
                             input_shape=input_shape, stats=stats)
    # Loading casts a half-precision file's values into the model's fp32 parameters.
    # bf16 computes in bf16; fp16 does on a GPU, while on a CPU (emulated fp16 is several
    # times slower than fp32) it stays a storage format and computes in fp32.
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    elif precision == "fp16" and torch.device(device).type == "cuda":
        model = model.half()
    return model.eval()
