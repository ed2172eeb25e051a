"""2:4 sparsity on NVIDIA GPUs with real sparse kernels, kept only where it is faster.

``sparsify_2to4`` takes a 2:4-pruned network (``netshrink.prune.nm``), folds its batch
norms, and for every conv/linear layer whose weight is 2:4 along its input channels builds
two GEMM versions of it (``netshrink.runtime.gemm_lowering``): one with the dense weight and
one with torch's semi-structured sparse weight (``torch.sparse.to_sparse_semi_structured``:
cuSPARSELt, or CUTLASS on compute capability 8.x). Each is timed on that layer's real input
against the original layer (cuDNN for a conv, cuBLAS for a linear), side by side with CUDA
events; ``auto`` mode keeps the sparse version only where it beats the original, ``all``
uses it wherever it runs and agrees. Every replacement is checked against the original
layer's output first. The per-layer report says what won and why a layer stayed dense.

What the kernels accept is in ``netshrink.runtime.semi_sparse_support``. Of the products,
torch supports ``F.linear(x, W_sparse)`` (``x @ W_sparse.t()``) and ``W_sparse @ x``; the
lowering uses the first. The model this returns must not be moved
(``.to()``/``.half()``): a semi-structured tensor only supports its GEMMs.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from netshrink.errors import UserError
from netshrink.models.fold import fold_batchnorm
from netshrink.runtime.gemm_lowering import ConvAsGemm, LinearAsGemm
from netshrink.runtime.semi_sparse_support import (
    BACKENDS,
    Backend,
    LayerReport,
    check_2to4_support,
    plan_2to4,
    shape_constraints,
)

__all__ = [
    "BACKENDS",
    "LayerReport",
    "check_2to4_support",
    "plan_2to4",
    "report_markdown",
    "shape_constraints",
    "sparsify_2to4",
]

Mode = Literal["auto", "all"]


@contextmanager
def _backend(backend: str) -> Iterator[None]:
    # to_sparse_semi_structured picks its class from this class-wide switch; set it only
    # while converting, so other users of torch.sparse are left alone.
    cls = torch.sparse.SparseSemiStructuredTensor
    old = cls._FORCE_CUTLASS
    cls._FORCE_CUTLASS = backend == "cutlass"
    try:
        with warnings.catch_warnings():  # "prototype stage": said once, in the docs
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        cls._FORCE_CUTLASS = old


def _to_semi_structured(weight: Tensor, *, backend: str) -> Tensor:
    with _backend(backend):
        return torch.sparse.to_sparse_semi_structured(weight.contiguous())


def _search_alg(sparse: ConvAsGemm | LinearAsGemm, x: Tensor) -> int | None:
    """Ask cuSPARSELt for its fastest algorithm for this GEMM and set it on the weight.

    Mirrors the call torch's ``F.linear`` makes (``_cslt_sparse_mm(packed, cols.t(),
    transpose_result=True)``); any failure (another torch, CUTLASS) keeps the default.
    """
    weight = sparse.weight
    if getattr(weight, "BACKEND", None) != "cusparselt" or getattr(weight, "packed", None) is None:
        return None
    with torch.inference_mode():
        cols = sparse.columns(x) if isinstance(sparse, ConvAsGemm) else x.reshape(-1, x.shape[-1])
        try:
            alg = int(torch._cslt_sparse_mm_search(  # type: ignore[attr-defined]
                weight.packed, cols.t(), bias=sparse.bias, transpose_result=True))
        except (RuntimeError, AttributeError, TypeError):
            return None
    weight.alg_id_cusparselt = alg  # read by every later matmul with this weight
    return alg


def _capture_inputs(model: nn.Module, x: Tensor, names: list[str]) -> dict[str, Tensor]:
    """Each named layer's input on ``x`` (its first call's)."""
    modules = dict(model.named_modules())
    inputs: dict[str, Tensor] = {}

    def keep(name: str, _m: nn.Module, args: tuple) -> None:
        inputs.setdefault(name, args[0].detach())

    handles = [modules[n].register_forward_pre_hook(partial(keep, n)) for n in names]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return inputs


def _time_side_by_side(
    fns: dict[str, Callable[[Tensor], Tensor]], x: Tensor, *, warmup: int, iters: int,
    repeats: int,
) -> dict[str, float]:
    """Median ms per call of each fn on ``x``: ``repeats`` rounds, each timing ``iters``
    back-to-back calls of every fn in turn with CUDA events (so drift hits all alike)."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):  # pays for cuDNN's algorithm search, lazy init
                fn(x)
        torch.cuda.synchronize()
        for _ in range(repeats):
            for key, fn in fns.items():
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn(x)
                end.record()
                end.synchronize()
                samples[key].append(start.elapsed_time(end) / iters)
    return {k: statistics.median(v) for k, v in samples.items()}


def _rel_err(out: Tensor, ref: Tensor) -> float:
    scale = ref.abs().max().float().item()
    err = (out.float() - ref.float()).abs().max().item()
    return err / scale if scale > 0 else err


def _try_layer(
    row: LayerReport, layer: nn.Module, x: Tensor, *, backend: str, min_rows: int,
    mode: str, margin: float, tolerance: float, alg_search: bool, timing: dict[str, int],
) -> nn.Module | None:
    """Time ``layer`` three ways on ``x``, fill ``row``, and return the sparse module when
    it should replace the layer."""
    make = ConvAsGemm if isinstance(layer, nn.Conv2d) else LinearAsGemm
    dense = make(layer)  # type: ignore[arg-type]
    to_matrix = partial(_to_semi_structured, backend=backend)
    try:
        sparse = make(layer, to_matrix=to_matrix, row_multiple=min_rows)  # type: ignore[arg-type]
        row.alg_id = _search_alg(sparse, x) if alg_search else None
        with torch.inference_mode():
            ref = layer(x)
            try:
                out = sparse(x)
            except RuntimeError:
                if not row.alg_id:
                    raise
                sparse.weight.alg_id_cusparselt = 0  # a searched id the matmul refused
                row.alg_id = None
                out = sparse(x)
    except (RuntimeError, NotImplementedError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        row.reason = f"the sparse kernel refused it: {first[:160]}"
        return None
    k = dense.weight.shape[1]
    n_out = dense.out_channels if isinstance(dense, ConvAsGemm) else dense.out_features
    row.gemm = (out.numel() // n_out, k, n_out)
    row.max_rel_err = _rel_err(out, ref)
    times = _time_side_by_side({"orig": layer, "dense": dense, "sparse": sparse}, x, **timing)
    row.cudnn_ms, row.dense_gemm_ms, row.sparse_ms = times["orig"], times["dense"], times["sparse"]
    if not math.isfinite(row.max_rel_err) or row.max_rel_err > tolerance:
        row.reason = (f"sparse output differs from the layer's (max rel err "
                      f"{row.max_rel_err:.1e} > {tolerance:g}): kept dense")
        return None
    if mode == "auto" and not row.sparse_ms < row.cudnn_ms * (1.0 - margin):
        row.reason = "sparse not faster than the original layer"
        return None
    row.used = True
    return sparse


def sparsify_2to4(
    model: nn.Module,
    *,
    example: Tensor,
    dtype: torch.dtype = torch.float16,
    mode: Mode = "auto",
    backend: Backend = "cusparselt",
    device: str | torch.device = "cuda",
    warmup: int = 5,
    iters: int = 20,
    repeats: int = 5,
    margin: float = 0.02,
    tolerance: float = 1e-2,
    alg_search: bool = False,
    layers: list[str] | None = None,
) -> tuple[nn.Module, list[LayerReport]]:
    """Run a 2:4-pruned model's layers through sparse tensor-core GEMMs where that pays.

    Args:
        model: a network pruned with ``netshrink.prune.nm`` (2:4 along input channels);
            not changed.
        example: a representative input batch ``[N, C, H, W]`` (its shape sets the GEMM
            sizes the layers are timed at; time with the batch size you will deploy).
        dtype: fp16 (default) or bf16; fp32 only through CUTLASS.
        mode: ``auto`` replaces a layer only where its sparse GEMM beats the original
            layer (cuDNN/cuBLAS) by ``margin``; ``all`` replaces every eligible layer.
        backend: ``cusparselt`` (default; any 8.0+ GPU) or ``cutlass`` (8.x only).
        device: the CUDA device.
        warmup / iters / repeats: per layer, untimed calls first, then ``repeats`` rounds
            of ``iters`` back-to-back calls of each version; the median round counts.
        margin: in ``auto``, the least fractional gain a sparse layer must show.
        tolerance: the largest max |sparse - original| / max |original| accepted on the
            real input; a layer over it stays dense, in either mode.
        alg_search: let cuSPARSELt pick its fastest algorithm per layer on the layer's real
            input (``torch._cslt_sparse_mm_search``) instead of algorithm 0; the choice is
            for that GEMM shape, so for the example's batch size.
        layers: replace exactly these layers (an earlier ``auto`` run's choice, so that
            measuring again runs what was chosen); the others stay dense untimed.

    Returns:
        The new model (BN folded, ``dtype``, channels_last, eval, on ``device``; feed it
        ``dtype`` channels_last inputs there, and do not move it) and one ``LayerReport``
        per conv/linear layer.

    Raises:
        UserError: no CUDA, a GPU below compute capability 8.0, an unsupported dtype or
            backend, or an unknown mode.
    """
    if mode not in ("auto", "all"):
        raise UserError(f"mode must be 'auto' or 'all', not {mode!r}")
    if margin < 0 or tolerance <= 0 or min(iters, repeats) < 1 or warmup < 0:
        raise UserError("margin >= 0, tolerance > 0, iters >= 1, repeats >= 1, warmup >= 0")
    dev = check_2to4_support(dtype, backend, device)
    min_rows = shape_constraints(backend)[dtype][0]
    work = fold_batchnorm(model).to(device=dev, dtype=dtype)
    work = work.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    x = example.to(device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    rows = plan_2to4(work, dtype=dtype, backend=backend)
    if layers is not None:
        mode = "all"
        for row in rows:
            if row.reason is None and row.name not in layers:
                row.reason = "not among the layers chosen"
    inputs = _capture_inputs(work, x, [r.name for r in rows if r.reason is None])
    modules = dict(work.named_modules())
    timing = {"warmup": warmup, "iters": iters, "repeats": repeats}
    for row in rows:
        if row.reason is not None:
            continue
        layer_input = inputs.pop(row.name, None)
        if layer_input is None:
            row.reason = "not called in the forward pass"
            continue
        sparse = _try_layer(row, modules[row.name], layer_input, backend=backend,
                            min_rows=min_rows, mode=mode, margin=margin,
                            tolerance=tolerance, alg_search=alg_search, timing=timing)
        if sparse is not None:
            work.set_submodule(row.name, sparse)
    return work, rows


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def report_markdown(rows: list[LayerReport]) -> str:
    """The per-layer table of a ``sparsify_2to4`` run as markdown, with a summary line."""
    lines = [
        "| layer | kind | GEMM M×K×N | cuDNN/cuBLAS ms | dense GEMM ms | 2:4 sparse ms "
        "| speedup vs cuDNN | sparse used | note |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        gemm = "×".join(str(v) for v in r.gemm) if r.gemm else ""
        speedup = f"{r.speedup:.2f}x" if r.speedup is not None else ""
        note = (r.reason or "").replace("|", "/")
        lines.append(f"| {r.name} | {r.kind} | {gemm} | {_ms(r.cudnn_ms)} | "
                     f"{_ms(r.dense_gemm_ms)} | {_ms(r.sparse_ms)} | {speedup} | "
                     f"{'yes' if r.used else 'no'} | {note} |")
    timed = [r for r in rows if r.cudnn_ms is not None and r.sparse_ms is not None]
    before = sum(r.cudnn_ms for r in timed)  # type: ignore[misc]
    after = sum(r.sparse_ms if r.used else r.cudnn_ms for r in timed)  # type: ignore[misc]
    lines.append("")
    lines.append(
        f"{sum(r.used for r in rows)} of {len(rows)} layers sparse "
        f"({len(timed)} timed, {sum(r.reason is not None and r.gemm is None for r in rows)} "
        f"ineligible); sum over timed layers: {before:.3f} ms original -> {after:.3f} ms chosen"
        + (f" ({before / after:.2f}x)" if after > 0 else "")
    )
    return "\n".join(lines) + "\n"
