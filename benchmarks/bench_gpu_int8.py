"""Is there an INT8 path on a GPU that torch alone can run faster than fp16? Measured per GEMM.

torch has no INT8 convolution on CUDA: its quantized convolutions (``torch.ao``) run on CPUs
only. What it has is an INT8 matrix product, ``torch._int_mm`` (cuBLASLt, int8 inputs,
int32 output). A ResNet's 1x1 convolutions and its classifier are plain GEMMs in
channels_last memory, so this script asks the honest question for exactly those layers of
ResNet-18/50 at 224x224: for each GEMM shape (M = batch x H x W, K = Cin, N = Cout) it
times, side by side on the same data:

* fp16: ``x @ w.T`` (what an fp16 channels_last model runs for that layer);
* int8 GEMM alone: ``torch._int_mm(x_int8, w_int8.T)`` (the best INT8 could do);
* int8 dynamic: quantize ``x`` per row (absmax / 127), ``_int_mm``, rescale to fp16 (what a
  real INT8 layer must do, as torchao's dynamic int8 does for linear layers).

The sums over a model's layers say whether an INT8 runtime built this way would beat fp16
for those layers; the kxk convolutions, most of a ResNet's MACs, would stay fp16 anyway.
TensorRT (not installable here) has INT8 convolutions: the QDQ ONNX from
``export.tensorrt`` is the INT8 path for a GPU.

    python benchmarks/bench_gpu_int8.py --out benchmarks/results     # on a GPU, ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from netshrink.bench.timing import time_model
from netshrink.models import ModelSpec, build_model

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Gemm:
    layer: str
    m: int
    k: int
    n: int
    fp16_ms: float | None = None
    int8_mm_ms: float | None = None
    int8_dynamic_ms: float | None = None


def gemm_shapes(model: nn.Module, input_shape: list[int], batch: int) -> list[Gemm]:
    """The (M, K, N) of every 1x1 convolution and linear layer at ``batch`` images."""
    shapes: list[Gemm] = []
    hooks = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if isinstance(module, nn.Linear):
                shapes.append(Gemm(name, batch, module.in_features, module.out_features))
            else:
                _, c_out, h, w = output.shape
                shapes.append(Gemm(name, batch * h * w, module.in_channels, c_out))
        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
                isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)):
            hooks.append(module.register_forward_hook(hook(name)))
    with torch.inference_mode():
        model.eval()(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    return shapes


def _quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-8) / 127.0
    return (x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


def time_gemm(g: Gemm, device: str, runs: int) -> Gemm:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(g.m, g.k, device=device, generator=gen).half()
    w = torch.randn(g.n, g.k, device=device, generator=gen).half()
    w_int8, w_scale = _quantize_rows(w)
    w_int8_t = w_int8.t()  # column-major: the layout cuBLASLt's int8 kernels take
    x_int8, _ = _quantize_rows(x)

    def dynamic(a: Tensor) -> Tensor:
        q, s = _quantize_rows(a)
        return (torch._int_mm(q, w_int8_t).float() * s * w_scale.t()).half()

    def timed(fn) -> float:
        return time_model(fn, x, warmup=5, runs=runs, min_seconds=0.2).p50_ms

    g.fp16_ms = timed(lambda a: a @ w.t())
    if g.m > 16 and g.k % 8 == 0 and g.n % 8 == 0:  # _int_mm's shape rules
        g.int8_mm_ms = time_model(lambda _: torch._int_mm(x_int8, w_int8_t), x, warmup=5,
                                  runs=runs, min_seconds=0.2).p50_ms
        g.int8_dynamic_ms = timed(dynamic)
    return g


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_int8: no CUDA device here; it needs an NVIDIA GPU", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {}
    lines = [f"# INT8 GEMMs vs fp16 on {torch.cuda.get_device_name()} (torch {torch.__version__})",
             "", "1x1 convolutions and the classifier as GEMMs; sums over a model's layers; "
             "p50 of each product.", "",
             "| model | batch | GEMMs | fp16 ms | int8 _int_mm ms (x fp16) "
             "| int8 dynamic ms (x fp16) |", "|---|---:|---:|---:|---:|---:|"]
    for name in args.models:
        model = build_model(ModelSpec(arch=name, num_classes=1000))
        for batch in args.batches:
            gemms = [time_gemm(g, "cuda", args.runs)
                     for g in gemm_shapes(model, [3, 224, 224], batch)]
            results[f"{name}-b{batch}"] = [asdict(g) for g in gemms]
            ok = [g for g in gemms if g.int8_mm_ms is not None]
            fp16 = sum(g.fp16_ms for g in ok)
            mm = sum(g.int8_mm_ms for g in ok)
            dyn = sum(g.int8_dynamic_ms for g in ok)
            lines.append(f"| {name} | {batch} | {len(ok)}/{len(gemms)} | {fp16:.3f} | "
                         f"{mm:.3f} ({fp16 / mm:.2f}x) | {dyn:.3f} ({fp16 / dyn:.2f}x) |")
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_int8_gemm.json").write_text(json.dumps(results, indent=2))
    (args.out / "gpu_int8_gemm.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
