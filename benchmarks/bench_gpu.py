"""GPU inference of ResNets, every way torch can run them, side by side in one process.

For ResNet-18 and ResNet-50 at 3x224x224 (ImageNet stem, 1000 classes) and ResNet-18 with
the CIFAR stem at 3x32x32, each *variant* (a ``TorchExecution``: precision, channels_last,
torch.compile mode, 2:4 sparse kernels) is prepared and timed with netshrink's own timing
code (CUDA events, synchronised): batch-1 latency p50/p90, throughput at batch 64 and 256,
and the allocator's peak memory at the largest batch. Ratios are against eager fp32
(strict fp32, TF32 off) measured in the same run.

Weights are random (``randomized_model``): speed does not depend on their values, except
for 2:4 variants, which run on a 2:4-pruned copy (``prune.nm``) so that the pattern the
sparse kernels need is there. A variant that fails (a kernel or compiler refusing a shape)
is recorded with its error rather than stopping the run.

INT8: torch has no INT8 convolution kernel on CUDA (its quantized convolutions are CPU
only; ``torch._int_mm`` multiplies matrices, not convolutions), so there is no INT8 row:
the INT8 path to a GPU is TensorRT with the QDQ ONNX ``export.tensorrt`` writes.

    python benchmarks/bench_gpu.py --models resnet18          # on a GPU: minutes per model
    python benchmarks/bench_gpu.py --models resnet18 --variants fp32 fp16-cl
    python benchmarks/bench_gpu.py --device cpu --quick       # checks the script on a CPU

Writes ``gpu_inference.json`` and ``gpu_inference.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from netshrink.bench.environment import environment
from netshrink.bench.memory import peak_memory
from netshrink.bench.timing import time_model
from netshrink.models import ModelSpec, randomized_model
from netshrink.prune.nm import NMPruneConfig, prune_nm
from netshrink.runtime.torch_exec import TorchExecution, prepare_torch

RESULTS = Path(__file__).resolve().parent / "results"

MODELS = {
    "resnet18": (ModelSpec(arch="resnet18", num_classes=1000), [3, 224, 224]),
    "resnet50": (ModelSpec(arch="resnet50", num_classes=1000), [3, 224, 224]),
    "resnet18-cifar": (ModelSpec(arch="resnet18", num_classes=10, stem="cifar"), [3, 32, 32]),
    "resnet_tiny": (ModelSpec(arch="resnet_tiny", num_classes=10, stem="cifar"), [3, 16, 16]),
}

VARIANTS = {
    "fp32": TorchExecution(precision="fp32"),
    "tf32": TorchExecution(precision="tf32"),
    "fp16": TorchExecution(precision="fp16"),
    "bf16": TorchExecution(precision="bf16"),
    "fp32-cl": TorchExecution(precision="fp32", channels_last=True),
    "fp16-cl": TorchExecution(precision="fp16", channels_last=True),
    "bf16-cl": TorchExecution(precision="bf16", channels_last=True),
    "fp16-cl-compile": TorchExecution(precision="fp16", channels_last=True, compile="default"),
    "fp16-cl-cudagraphs": TorchExecution(precision="fp16", channels_last=True,
                                         compile="reduce-overhead"),
    "fp16-cl-max-autotune": TorchExecution(precision="fp16", channels_last=True,
                                           compile="max-autotune"),
    "fp16-cl-2:4-auto": TorchExecution(precision="fp16", channels_last=True, sparse24="auto"),
    "fp16-cl-2:4-all": TorchExecution(precision="fp16", channels_last=True, sparse24="all"),
    "fp16-cl-2:4-auto-cudagraphs": TorchExecution(precision="fp16", channels_last=True,
                                                  sparse24="auto", compile="reduce-overhead"),
}
CPU_VARIANTS = ["fp32", "bf16", "fp32-cl", "bf16-cl"]
BASELINE = "fp32"


@dataclass
class Row:
    model: str
    variant: str
    label: str
    p50_ms: float | None = None
    p90_ms: float | None = None
    throughput: dict[int, float] = field(default_factory=dict)  # batch -> images/s
    peak_mb: float | None = None
    sparse_layers: str | None = None  # "used/eligible" for 2:4 variants
    seconds: float = 0.0  # preparing + compiling + timing
    error: str | None = None


def run_variant(name: str, model_name: str, model: torch.nn.Module,
                shape: list[int], args: argparse.Namespace) -> Row:
    execution = VARIANTS[name]
    row = Row(model=model_name, variant=name, label=execution.label())
    started = time.perf_counter()
    prepared = None
    try:
        if execution.sparse24 != "off":  # layers chosen at the largest batch
            execution = execution.model_copy(update={"sparse_batch": max(args.batches)})
        prepared = prepare_torch(model, execution, device=args.device, input_shape=shape)
        gen = torch.Generator().manual_seed(0)
        dtype, fmt = prepared.dtype, prepared.memory_format

        def ready(x: torch.Tensor) -> torch.Tensor:
            # Inputs already in the model's dtype and layout: a served model gets them so,
            # and a cast inside the timed call would be timed (and counted in memory).
            return x.to(args.device, dtype).contiguous(memory_format=fmt)

        one = ready(torch.randn(1, *shape, generator=gen))
        lat = time_model(prepared, one, warmup=args.warmup, runs=args.runs,
                         min_seconds=args.seconds)
        row.p50_ms, row.p90_ms = lat.p50_ms, lat.p90_ms
        for batch in args.batches:
            x = ready(torch.randn(batch, *shape, generator=gen))
            thr = time_model(prepared, x, warmup=max(3, args.warmup // 3), runs=args.runs,
                             min_seconds=args.seconds)
            row.throughput[batch] = thr.images_per_s
        row.peak_mb = peak_memory(prepared, x, calls=2)[0]
        if prepared.sparse_report:
            used = sum(r.used for r in prepared.sparse_report)
            timed = sum(r.gemm is not None for r in prepared.sparse_report)
            row.sparse_layers = f"{used}/{timed}"
    except Exception as exc:  # recorded, not raised: one refusing variant must not end the run
        first = (str(exc).splitlines() or [""])[0]
        row.error = f"{type(exc).__name__}: {first[:200]}"
    finally:
        if prepared is not None:
            prepared.close()  # its compiled graphs and CUDA-graph pools: not the next row's
        gc.collect()
    row.seconds = time.perf_counter() - started
    return row


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[Row], batches: list[int], env: dict) -> str:
    lines = [f"# GPU inference: {env.get('gpu') or env['cpu']}", "",
             f"torch {env['versions'].get('torch')}, CUDA {env['versions'].get('cuda', '—')}; "
             "random weights (speed only); ratios against eager fp32 (TF32 off) in the same run. "
             "GPU memory is the allocator's peak reserved (it counts CUDA graphs' pools). "
             "2:4 auto rows keep the sparse layers chosen at the largest batch, batch 1 too.",
             ""]
    for model in dict.fromkeys(r.model for r in rows):
        group = [r for r in rows if r.model == model]
        base = next((r for r in group if r.variant == BASELINE and r.error is None), None)
        lines += [f"## {model}", "",
                  "| variant | b1 p50 ms | b1 p90 ms | " +
                  " | ".join(f"b{b} img/s" for b in batches) +
                  f" | peak MiB (b{batches[-1]}) | b1 speed-up | b{batches[-1]} speed-up "
                  "| 2:4 layers | s |",
                  "|---|---:|---:|" + "---:|" * len(batches) + "---:|---:|---:|---|---:|"]
        for r in group:
            if r.error:
                lines.append(f"| {r.label} | failed: {r.error} |" + " |" * (len(batches) + 6))
                continue
            up1 = base.p50_ms / r.p50_ms if base and base.p50_ms and r.p50_ms else None
            big = batches[-1]
            upn = (r.throughput[big] / base.throughput[big]
                   if base and big in base.throughput and big in r.throughput else None)
            lines.append(
                f"| {r.label} | {_fmt(r.p50_ms, '.3f')} | {_fmt(r.p90_ms, '.3f')} | " +
                " | ".join(_fmt(r.throughput.get(b), ",.0f") for b in batches) +
                f" | {_fmt(r.peak_mb, ',.0f')} | {_fmt(up1)}x | {_fmt(upn)}x | "
                f"{r.sparse_layers or ''} | {r.seconds:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS),
                   default=["resnet18", "resnet50", "resnet18-cifar"])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    p.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=10, help="least timed calls per figure")
    p.add_argument("--seconds", type=float, default=1.0, help="least timed seconds per figure")
    p.add_argument("--quick", action="store_true", help="resnet_tiny, small batches, CPU-safe")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag-models", action="store_true",
                   help="name the output files after the models (one call per model)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; it needs an NVIDIA GPU (or pass --device cpu "
              "--quick to check the script)", file=sys.stderr)
        return 2
    if args.quick:
        args.models, args.batches = ["resnet_tiny"], [4, 8]
        args.warmup, args.runs, args.seconds = 2, 3, 0.0
    # max-autotune searches kernels for minutes per input shape: only when named.
    variants = args.variants or ([v for v in VARIANTS if "max-autotune" not in v]
                                 if args.device.startswith("cuda") else CPU_VARIANTS)
    if BASELINE not in variants:
        variants = [BASELINE, *variants]
    env = environment(device=args.device, threads=torch.get_num_threads(), seed=0).model_dump()
    rows: list[Row] = []
    for model_name in args.models:
        spec, shape = MODELS[model_name]
        model = randomized_model(spec, seed=0).eval()
        sparse = None
        for name in variants:
            if VARIANTS[name].sparse24 != "off" and sparse is None:
                sparse = prune_nm(model, NMPruneConfig())[0]
            row = run_variant(name, model_name,
                              sparse if VARIANTS[name].sparse24 != "off" else model, shape, args)
            print(f"{model_name:15s} {row.label:45s} "
                  + (f"failed: {row.error}" if row.error else
                     f"b1 p50 {row.p50_ms:.3f} ms, " + ", ".join(
                         f"b{b} {v:,.0f} img/s" for b, v in row.throughput.items())),
                  flush=True)
            rows.append(row)
            _write(args, env, rows)  # after every row: a run cut short keeps what it timed
    print(f"wrote {args.out / _stem(args)}.md and .json")
    return 0


def _stem(args: argparse.Namespace) -> str:
    name = "gpu_inference" if args.device.startswith("cuda") else "gpu_inference_cpu_check"
    return "-".join([name, *args.models]) if args.tag_models else name


def _write(args: argparse.Namespace, env: dict, rows: list[Row]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{_stem(args)}.json").write_text(json.dumps(
        {"environment": env, "rows": [asdict(r) for r in rows]}, indent=2))
    (args.out / f"{_stem(args)}.md").write_text(markdown(rows, args.batches, env))


if __name__ == "__main__":
    sys.exit(main())
