"""TensorRT as a runtime (optional, ``pip install 'netshrink[tensorrt]'``, NVIDIA GPU).

UNVERIFIED: TensorRT cannot be installed on the machines netshrink is developed on (its
package fetches NVIDIA's libraries from NVIDIA's own index), so this module has never
run; its tests skip where ``tensorrt`` does not import. It follows TensorRT 10's Python
API as documented: named I/O tensors (``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``), one optimization profile for the dynamic batch, and a strongly
typed network for the fp16 and QDQ-INT8 files ``export.tensorrt`` writes (their types,
not builder flags, set the precision). The fp32 file builds with TF32 off, so that it
measures fp32 as the torch fp32 rows do.

The engine is built once and saved beside the file, named by the file's hash, TensorRT's
version, the GPU and the batch range; inputs and outputs are torch CUDA tensors, so the
timing code (CUDA events) measures TensorRT's own work, not host copies. Its GPU memory is
not recorded: TensorRT allocates it out of sight of torch's allocator.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from netshrink.errors import UserError
from netshrink.runtime.base import Executable, ModelStats
from netshrink.store.atomic import atomic_write_bytes
from netshrink.store.digest import file_sha256

__all__ = ["TensorRTModule", "build_engine", "open_tensorrt"]

WORKSPACE_BYTES = 4 << 30


def _trt():  # type: ignore[no-untyped-def]
    from netshrink.runtime.sessions import require

    return require("tensorrt")


def build_engine(onnx_file: Path, *, input_shape: Sequence[int], min_batch: int = 1,
                 opt_batch: int = 64, max_batch: int = 256) -> bytes:
    """A serialized TensorRT engine for ``onnx_file`` over batches ``min..max``.

    Raises:
        UserError: TensorRT is missing, its parser rejects the file, or the build fails.
    """
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # fp16 / QDQ files carry their precision in their types: a strongly typed network
    # keeps them (the fp32 file is all float32, so the flag changes nothing there).
    network = builder.create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_file.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_file}: TensorRT's ONNX parser rejects it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    shape = tuple(int(d) for d in input_shape)
    profile.set_shape(name, (min_batch, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UserError(f"{onnx_file}: TensorRT could not build an engine (see its log above)")
    return bytes(engine)


class TensorRTModule(Executable):
    """A TensorRT engine called with torch CUDA tensors."""

    # TensorRT allocates its activations itself, out of sight of torch's allocator: a
    # measurement of its GPU memory would show only the inputs and outputs.
    memory_visible = False

    def __init__(self, engine_bytes: bytes, *, precision: str, stats: ModelStats,
                 device: torch.device, options: dict[str, object]) -> None:
        super().__init__(runtime="tensorrt", precision=precision, stats=stats, options=options)
        self.max_batch = int(options["max_batch"])  # type: ignore[call-overload]
        trt = _trt()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise UserError("TensorRT could not load the engine (built by another version?)")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names
                  if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._input, self._output = inputs[0], next(n for n in names if n not in inputs)
        self.device = device

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.device, torch.float32).contiguous()
        if not self._context.set_input_shape(self._input, tuple(x.shape)):
            raise UserError(f"batch {x.shape[0]} is outside the engine's range 1..."
                            f"{self.max_batch}; raise the stage's max_batch")
        out = torch.empty(tuple(self._context.get_tensor_shape(self._output)),
                          dtype=torch.float32, device=self.device)
        self._context.set_tensor_address(self._input, x.data_ptr())
        self._context.set_tensor_address(self._output, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise UserError("TensorRT failed to run the engine")
        return out


def open_tensorrt(path: Path, *, stats: ModelStats, precision: str | None, device: str,
                  input_shape: Sequence[int], opt_batch: int = 64, max_batch: int = 256
                  ) -> TensorRTModule:
    """Build (or reuse the saved) engine of an ONNX file and wrap it as a module.

    Raises:
        UserError: no CUDA device, TensorRT missing, or the engine does not build.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise UserError("TensorRT runs on an NVIDIA GPU: use device cuda, or measure the "
                        "file in onnxruntime")
    # An engine is specific to its ONNX file, TensorRT version, GPU and batch range.
    trt = _trt()
    gpu = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(dev))
    plan = path.with_name(f"{path.stem}.{file_sha256(path)[:12]}.trt{trt.__version__}."
                          f"{gpu}.1-{opt_batch}-{max_batch}.plan")
    if plan.is_file():
        engine = plan.read_bytes()
    else:
        engine = build_engine(path, input_shape=input_shape, opt_batch=opt_batch,
                              max_batch=max_batch)
        atomic_write_bytes(plan, engine)
    return TensorRTModule(engine, precision=precision or "fp32", stats=stats, device=dev,
                          options={"opt_batch": opt_batch, "max_batch": max_batch})
