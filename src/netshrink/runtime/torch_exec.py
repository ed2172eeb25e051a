"""torch as a runtime of its own: a model prepared the ways that make it fast on a GPU.

One ``TorchExecution`` names a preparation: compute precision (fp32, tf32, fp16, bf16),
NHWC memory (``channels_last``), ``torch.compile`` (Inductor; ``reduce-overhead`` adds
CUDA graphs, ``max-autotune`` searches GEMM/conv kernels and uses CUDA graphs too), and 2:4
semi-structured sparse kernels. ``prepare_torch`` applies it and returns an
``Executable``, so every preparation is timed, evaluated and recorded by the same code as
ONNX Runtime and OpenVINO sessions.

Everything here also runs on a CPU (bf16, channels_last and compile are real there),
except fp16/tf32 compute and the sparse kernels, which need an NVIDIA GPU and say so.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from netshrink.errors import UserError
from netshrink.runtime.base import Executable, ModelStats, model_stats

__all__ = ["DTYPES", "TorchExecutable", "TorchExecution", "check_execution", "cuda_flags",
           "prepare_torch"]

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
          "bf16": torch.bfloat16}
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")


class TorchExecution(BaseModel):
    """How torch runs a model (the ``deploy.torch`` stage, ``netshrink bench --torch``).

    Attributes:
        precision: compute precision. ``fp32`` is strict fp32 (TF32 tensor cores off, so
            the figure is really fp32); ``tf32`` lets cuDNN/cuBLAS use TF32 (torch's own
            default for convolutions on Ampere and newer); ``fp16`` / ``bf16`` cast the
            weights and inputs.
        channels_last: NHWC memory, what tensor-core convolutions read natively.
        compile: ``torch.compile`` mode; ``off`` runs eagerly.
        sparse24: 2:4 sparse kernels for the layers whose weights are 2:4 sparse:
            ``auto`` keeps a sparse layer only where it timed faster than cuDNN, ``all``
            uses every eligible one, ``off`` none.
        sparse_batch: the batch size ``auto`` times the layers at (a GEMM's speed depends
            on it: give the batch the model will serve).
        sparse_layers: the layers ``auto`` chose (filled in by the stage that timed them,
            so measuring again does not re-time and perhaps choose differently).
    """

    model_config = ConfigDict(extra="forbid")

    precision: Literal["fp32", "tf32", "fp16", "bf16"] = "fp32"
    channels_last: bool = False
    compile: Literal[
        "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "off"
    sparse24: Literal["off", "auto", "all"] = "off"
    sparse_batch: int = Field(default=64, gt=0)
    sparse_layers: list[str] | None = Field(default=None)

    def label(self) -> str:
        """A short description: ``fp16, channels_last, compile max-autotune, 2:4 auto``."""
        parts = [self.precision]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile != "off":
            parts.append(f"compile {self.compile}")
        if self.sparse24 != "off":
            parts.append(f"2:4 {self.sparse24}")
        return ", ".join(parts)


@contextmanager
def cuda_flags(device: torch.device, precision: str) -> Iterator[None]:
    """cuDNN autotuning on, and TF32 on only for ``tf32``; restored after. (torch's own
    default lets cuDNN convolutions use TF32, so a plain "fp32" figure would not be fp32.)

    cuDNN's benchmark mode picks the fastest convolution algorithm per input shape on
    the first call (the warm-up pays for it); the shapes of a measurement never change.
    """
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    tf32 = precision == "tf32"
    cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = True, tf32, tf32
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = old


class TorchExecutable(Executable):
    """A prepared torch model: casts and lays out each input as the model expects, then
    calls it under the preparation's backend flags."""

    def __init__(self, inner: nn.Module, *, execution: TorchExecution, device: torch.device,
                 stats: ModelStats, sparse_report: list[Any] | None = None) -> None:
        super().__init__(runtime="torch", precision=execution.precision, stats=stats,
                         options=execution.model_dump(exclude_defaults=True))
        self.inner = inner
        self.execution = execution
        self.device = device
        self.dtype = DTYPES[execution.precision]
        self.sparse_report = sparse_report or []

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout inputs are given in (the sparse layers' GEMMs read NHWC too)."""
        nhwc = self.execution.channels_last or self.execution.sparse24 != "off"
        return torch.channels_last if nhwc else torch.contiguous_format

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.device, self.dtype, non_blocking=True)
        x = x.contiguous(memory_format=self.memory_format)
        with cuda_flags(self.device, self.execution.precision), self._loud_compiler():
            return self.inner(x)

    def _loud_compiler(self) -> contextlib.AbstractContextManager:
        """While a compiled model runs (and compiles), the compiler's silent fallbacks are
        errors: a row labelled "CUDA graphs" that ran without them (Inductor only logs
        "skipping cudagraphs"), or a model run eagerly after too many recompilations,
        would be a false measurement."""
        stack = contextlib.ExitStack()
        if self.execution.compile == "off":
            return stack
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
            stack.enter_context(dynamo_config.patch(fail_on_recompile_limit_hit=True))
        graphs = (self.execution.compile in ("reduce-overhead", "max-autotune")
                  and self.device.type == "cuda")
        if graphs and hasattr(inductor_config.triton, "cudagraph_or_error"):
            stack.enter_context(inductor_config.patch({"triton.cudagraph_or_error": True}))
        return stack

    def close(self) -> None:
        """Drop what compiling left process-wide: compiled graphs (they count towards a
        per-function recompile limit every later ResNet shares), CUDA graphs' memory pools
        (they would count in later stages' GPU memory), cached GPU blocks."""
        super().close()
        if self.execution.compile != "off":
            torch._dynamo.reset()
            trees = getattr(torch._inductor, "cudagraph_trees", None)
            if trees is not None and hasattr(trees, "reset_cudagraph_trees"):
                trees.reset_cudagraph_trees()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def check_execution(execution: TorchExecution, device: str | torch.device) -> None:
    """Refuse options the device cannot run (fp16/tf32 compute, 2:4 kernels on a CPU).

    Raises:
        UserError: naming the option and what to use instead.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return
    if execution.precision in ("fp16", "tf32"):
        raise UserError(f"precision {execution.precision} computes on an NVIDIA GPU; on a "
                        "CPU use fp32 or bf16 (or quant.fp16 for a half-size file)")
    if execution.sparse24 != "off":
        raise UserError("2:4 sparse kernels need an NVIDIA GPU (compute capability 8.0 or "
                        "newer); run with --device cuda, or set sparse24: off")


def prepare_torch(
    model: nn.Module,
    execution: TorchExecution,
    *,
    device: str | torch.device,
    input_shape: Sequence[int],
    stats: ModelStats | None = None,
    log: Any = None,
) -> TorchExecutable:
    """Prepare a copy of ``model`` as ``execution`` says, on ``device``.

    The caller's model is not changed. Compilation happens on the first call of each
    input shape (a measurement's warm-up calls pay for it).

    Args:
        model: a float torch model in any mode (it is put in eval mode).
        execution: the preparation.
        device: where it runs.
        input_shape: one image ``[C, H, W]`` (the sparse kernels are timed on a batch).
        stats: counts to record; default: counted on ``model``.
        log: where a line about the sparse layers goes (None: nowhere).

    Raises:
        UserError: a precision or sparse option the device cannot run.
    """
    dev = torch.device(device)
    check_execution(execution, dev)
    stats = stats or model_stats(model, list(input_shape))
    dtype = DTYPES[execution.precision]
    report: list[Any] = []
    if execution.sparse24 != "off":
        from netshrink.runtime.semi_sparse import sparsify_2to4

        example = torch.randn(execution.sparse_batch, *input_shape,
                              generator=torch.Generator().manual_seed(0))
        # It returns a copy with BN folded, in ``dtype``, channels_last, on ``dev``: a
        # model holding semi-structured weights must not be moved or cast again. cuDNN
        # is timed under the flags the model will run with (autotuned algorithms).
        with cuda_flags(dev, execution.precision):
            work, report = sparsify_2to4(model, example=example, dtype=dtype, device=dev,
                                         mode=execution.sparse24,
                                         layers=execution.sparse_layers)
        if log is not None:
            used = [r.name for r in report if r.used]
            log(f"2:4 sparse kernels in {len(used)} of {len(report)} layers")
    else:
        work = copy.deepcopy(model).eval().to(dev, dtype)
        if execution.channels_last:
            work = work.to(memory_format=torch.channels_last)
    if execution.compile != "off":
        # dynamic=False: one graph per input shape, each specialised (and, with CUDA
        # graphs, captured) for that shape; a measurement uses few shapes.
        work = torch.compile(work, mode=None if execution.compile == "default"
                             else execution.compile, dynamic=False)
    return TorchExecutable(work, execution=execution, device=dev, stats=stats,
                           sparse_report=report)
