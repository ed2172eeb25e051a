"""What the 2:4 sparse GEMM kernels accept, and which layers of a model qualify.

The constraints come from torch's ``torch/sparse/semi_structured.py`` (the classes'
``_DTYPE_SHAPE_CONSTRAINTS``, read at run time so a newer torch's table is used): compute
capability 8.0+; a 2-D, contiguous CUDA weight; cuSPARSELt takes fp16/bf16 (int8 and fp8
too, which need quantized activations and are not offered here) with both weight dimensions
multiples of 16; CUTLASS takes fp16/bf16 (rows x cols multiples of 32 x 64) and fp32
(32 x 32) and runs only on 8.x GPUs (not Hopper: "Supported only on GPUs with compute
capability 8.x", pytorch/pytorch#132928). The dense operand is zero-padded by torch itself.

Everything here runs without a GPU except ``check_2to4_support``'s success.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from netshrink.errors import UserError
from netshrink.runtime.gemm_lowering import conv_kind, unsupported_conv
from netshrink.runtime.nm_layout import is_nm_sparse

__all__ = [
    "BACKENDS",
    "LayerReport",
    "check_2to4_support",
    "plan_2to4",
    "shape_constraints",
]

Backend = Literal["cusparselt", "cutlass"]
BACKENDS: tuple[str, ...] = ("cusparselt", "cutlass")

# Float dtypes only: int8/fp8 sparse GEMMs need quantized activations and scales.
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# (min rows, min cols) of the sparse operand, from torch 2.13's tables; used only when the
# installed torch does not expose its own.
_FALLBACK_CONSTRAINTS: dict[str, dict[torch.dtype, tuple[int, int]]] = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.float32: (32, 32)},
}
_CLASS_NAMES = {
    "cusparselt": "SparseSemiStructuredTensorCUSPARSELT",
    "cutlass": "SparseSemiStructuredTensorCUTLASS",
}


@dataclass
class LayerReport:
    """One conv/linear layer of a ``sparsify_2to4`` run.

    Attributes:
        name: module name in the model.
        kind: ``conv1x1``, ``convkxk`` or ``linear``.
        gemm: the lowered GEMM's (M, K, N): rows of activations, reduction, output channels.
        cudnn_ms: the original layer (cuDNN conv, cuBLAS linear) on its real input.
        dense_gemm_ms: the lowering with the dense weight (im2col included).
        sparse_ms: the lowering with the 2:4 semi-structured weight.
        used: the model runs the sparse version of this layer.
        reason: why the layer is not sparse (ineligible, output differs, or slower); None
            when used, or when only planned and eligible.
        max_rel_err: max |sparse - original| / max |original| on the real input.
        alg_id: the cuSPARSELt algorithm the layer runs with (None: torch's default, 0).
    """

    name: str
    kind: str
    gemm: tuple[int, int, int] | None = None
    cudnn_ms: float | None = None
    dense_gemm_ms: float | None = None
    sparse_ms: float | None = None
    used: bool = False
    reason: str | None = None
    max_rel_err: float | None = None
    alg_id: int | None = None

    @property
    def speedup(self) -> float | None:
        """Original layer time over sparse time (above 1: sparse is faster)."""
        if self.cudnn_ms is None or not self.sparse_ms:
            return None
        return self.cudnn_ms / self.sparse_ms


def shape_constraints(backend: str) -> dict[torch.dtype, tuple[int, int]]:
    """The float dtypes ``backend`` accepts, each with the sparse operand's (min rows, min
    cols): both weight dimensions must be positive multiples of them."""
    if backend not in BACKENDS:
        raise UserError(f"unknown 2:4 backend {backend!r}; use one of {', '.join(BACKENDS)}")
    cls = getattr(torch.sparse, _CLASS_NAMES[backend], None)
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None)
    if not table:
        return dict(_FALLBACK_CONSTRAINTS[backend])
    return {
        dtype: (int(getattr(c, "sparse_min_rows", c[0])), int(getattr(c, "sparse_min_cols", c[1])))
        for dtype, c in table.items()
        if dtype in _FLOATS
    }


def _cusparselt_available() -> bool:
    module = getattr(torch.backends, "cusparselt", None)
    return bool(module is not None and module.is_available())


def check_2to4_support(
    dtype: torch.dtype = torch.float16,
    backend: str = "cusparselt",
    device: str | torch.device = "cuda",
) -> torch.device:
    """The CUDA device the 2:4 kernels will run on, after checking they can.

    Raises:
        UserError: naming what is missing and the fix: a dtype the backend does not take,
            no CUDA (a CPU-only torch or no NVIDIA GPU), a GPU below compute capability 8.0,
            a torch built without cuSPARSELt, or CUTLASS on a GPU that is not 8.x.
    """
    supported = shape_constraints(backend)
    if dtype not in supported:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported)
        raise UserError(
            f"2:4 sparse GEMMs through {backend} take {names}, not "
            f"{str(dtype).removeprefix('torch.')}: pass dtype=torch.float16"
        )
    if not torch.cuda.is_available() or torch.version.hip is not None:
        raise UserError(
            "2:4 sparse kernels need CUDA: an NVIDIA GPU of compute capability 8.0+ (Ampere "
            f"or newer) and a CUDA build of torch; this torch ({torch.__version__}) sees no "
            "CUDA device: run on a GPU machine"
        )
    dev = torch.device(device)
    if dev.type != "cuda":
        raise UserError(f"2:4 sparse kernels run on CUDA devices, not {str(dev)!r}: use 'cuda'")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    cc = torch.cuda.get_device_capability(dev)
    name = torch.cuda.get_device_name(dev)
    if cc < (8, 0):
        raise UserError(
            f"2:4 sparse tensor cores need compute capability 8.0+ (Ampere or newer); {name} "
            f"is {cc[0]}.{cc[1]}: use an A100/A10/L4/H100-class GPU"
        )
    if backend == "cusparselt" and not _cusparselt_available():
        raise UserError(
            f"this torch ({torch.__version__}) was built without cuSPARSELt: install a CUDA "
            "wheel from pytorch.org (they bundle it) or use backend='cutlass' on an 8.x GPU"
        )
    if backend == "cutlass" and cc[0] != 8:
        raise UserError(
            f"torch's CUTLASS 2:4 kernels run only on compute capability 8.x; {name} is "
            f"{cc[0]}.{cc[1]}: use backend='cusparselt'"
        )
    return dev


def _ineligible(layer: nn.Module, min_cols: int) -> str | None:
    """Why ``layer`` cannot run as a 2:4 GEMM (None when it can)."""
    weight = layer.weight
    if isinstance(layer, nn.Conv2d):
        reason = unsupported_conv(layer)
        if reason is not None:
            return reason
        k = weight.shape[1] * weight.shape[2] * weight.shape[3]
    else:
        k = weight.shape[1]
    if weight.shape[1] % 4:
        return (f"{weight.shape[1]} input channels are not a multiple of 4 "
                "(2:4 groups run along input channels)")
    if not is_nm_sparse(weight, 2, 4):
        return "weight is not 2:4 sparse along input channels (prune it with prune.nm)"
    if k % min_cols:
        return f"GEMM K={k} is not a multiple of {min_cols}, as the sparse kernel needs"
    return None


def plan_2to4(
    model: nn.Module, *, dtype: torch.dtype = torch.float16, backend: str = "cusparselt"
) -> list[LayerReport]:
    """One row per conv/linear layer of ``model``, in model order, with ``reason`` set for
    each layer that cannot run as a 2:4 sparse GEMM (None: eligible). Runs anywhere."""
    constraints = shape_constraints(backend)
    if dtype not in constraints:
        raise UserError(f"{backend} has no 2:4 kernel for {dtype}; use torch.float16")
    min_cols = constraints[dtype][1]
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            rows.append(LayerReport(name, conv_kind(m), reason=_ineligible(m, min_cols)))
        elif isinstance(m, nn.Linear):
            rows.append(LayerReport(name, "linear", reason=_ineligible(m, min_cols)))
    return rows
