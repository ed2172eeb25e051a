"""torch's own x86 INT8 path for the runtime benchmark: torchao PT2E + X86InductorQuantizer.

Flow: ``torch.export.export(strict=True)`` (what our ResNets needed with torch 2.13; the
batch dimension is exported dynamic so the calibration batches of 8 fit) -> ``prepare_pt2e``
with the X86 Inductor quantizer's default config (u8 activations per tensor with a histogram
observer, s8 symmetric weights per channel) -> calibrate -> ``convert_pt2e`` ->
``torch.compile`` with inductor freezing, which folds the quantized weights into packed oneDNN
INT8 conv/linear kernels (one static-shape graph per batch size). Importing the quantizer
module also registers torchao's inductor fusion passes (it sets
``torch._inductor.config.pre_grad_custom_pass``), so this changes torch.compile for the whole
process.

torchao is optional and not a project dependency: ``available()`` says whether it imports.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

VARIANT = "torch INT8 (torchao PT2E x86 + inductor)"


def available() -> str | None:
    """None when torchao's PT2E x86 flow imports, else why not."""
    # The PyPI torchao wheel ships CUDA-only extensions (mxfp8, cutlass sm90a) that log a
    # "Failed to load" warning on CPU torch, and torchao registers an Enum with pytree, which
    # torch 2.13 logs as deprecated; the PT2E x86 path needs neither.
    logs = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantize_pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except Exception as exc:  # ImportError, or an incompatible torch failing at import
        return f"{type(exc).__name__}: {exc}"
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)
    return None


class _Compiled(nn.Module):
    """The compiled INT8 graph, always called under inference_mode (one set of dynamo guards
    whether or not the caller is in inference_mode; no recompilation between the two)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.fn(x)


def torch_int8(model: nn.Module, shape: Sequence[int], calib: Sequence[np.ndarray],
               warm_batches: Sequence[int] = (1, 32)) -> tuple[nn.Module, dict[str, float]]:
    """Quantize ``model`` (eval, fp32) with PT2E for x86 and compile it with inductor.

    Returns the compiled callable and timings in seconds: ``export_quantize`` (export,
    prepare, calibrate, convert) and ``compile_b{n}`` (first call per batch size: dynamo +
    inductor, one static-shape graph each).
    """
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    times: dict[str, float] = {}
    start = time.perf_counter()
    example = (torch.from_numpy(np.ascontiguousarray(calib[0])),)
    batch_dim = ({0: torch.export.Dim("batch", min=1, max=4096)},)  # calib 8, run 1 and 32
    with torch.no_grad():
        exported = torch.export.export(model.eval(), example, dynamic_shapes=batch_dim,
                                       strict=True).module()
        quantizer = X86InductorQuantizer()
        quantizer.set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for batch in calib:
            prepared(torch.from_numpy(np.ascontiguousarray(batch)))
        converted = convert_pt2e(prepared)
    times["export_quantize"] = time.perf_counter() - start

    inductor_config.freezing = True  # fold weights into packed int8 kernels
    compiled = _Compiled(torch.compile(converted, dynamic=False))
    with warnings.catch_warnings():
        # torch 2.13's mkldnn lowering copy-constructs a tensor (a UserWarning per conv).
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        for n in warm_batches:
            start = time.perf_counter()
            compiled(torch.randn(n, *shape))
            times[f"compile_b{n}"] = time.perf_counter() - start
    return compiled, times
