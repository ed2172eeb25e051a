"""2:4 sparsity on an NVIDIA GPU with real sparse kernels: where it beats cuDNN, and by how much.

For ResNet-18 and ResNet-50 (ImageNet stem, 224x224, fp16, channels_last, eval, BN folded):
2:4-prune every layer that can be (``prune.nm``; the 3-channel stem cannot), then
``sparsify_2to4(mode="auto")``: each eligible conv/linear is lowered to a GEMM and timed on
its real input three ways (the original cuDNN conv, the dense GEMM, the cuSPARSELt 2:4
GEMM); the sparse one is kept only where it beats cuDNN. The per-layer table says where it
won. Then the dense fp16 model and the auto-sparse model are timed end to end, side by side
in alternating rounds (``netshrink.bench.timing.time_model``, CUDA events), and their logits
compared. (``--all`` adds the model with every eligible layer sparse, for contrast.)

Random weights and random BatchNorm statistics: the speed of a GEMM does not depend on the
values, and the accuracy cost of 2:4 pruning is a training question, not this one's.
Published experience with TensorRT says ~15% or less end to end for CNNs; this measures ours.

Writes ``<out>.json`` and ``<out>.md`` (default benchmarks/results/sparse24_gpu.*) with the
GPU name, torch, CUDA, cuDNN and cuSPARSELt versions.

    python benchmarks/bench_sparse24.py                       # resnet18+50, batch 64+256
    python benchmarks/bench_sparse24.py --models resnet50 --batches 64 --runs 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.bench.timing import time_model
from netshrink.errors import UserError
from netshrink.models import ModelSpec, randomized_model
from netshrink.models.fold import fold_batchnorm
from netshrink.prune.nm import NMPruneConfig, prune_nm
from netshrink.runtime.semi_sparse import (
    LayerReport,
    check_2to4_support,
    report_markdown,
    sparsify_2to4,
)

RESULTS = Path(__file__).resolve().parent / "results"


def gpu_environment() -> dict[str, object]:
    """The GPU, its compute capability and the library versions the kernels come from."""
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return {
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cusparselt": cusparselt.version() if cusparselt is not None else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def dense_fp16(pruned: nn.Module) -> nn.Module:
    """The baseline: the same pruned network, BN folded, fp16 channels_last, run by cuDNN."""
    model = fold_batchnorm(pruned).cuda().half()
    return model.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]


def compare_logits(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    out, ref = out.float(), ref.float()
    return {
        "max_rel_err": float((out - ref).abs().max() / ref.abs().max()),
        "cosine": float(F.cosine_similarity(out.flatten(), ref.flatten(), dim=0)),
        "top1_agree": float((out.argmax(1) == ref.argmax(1)).float().mean()),
    }


def time_side_by_side(models: dict[str, nn.Module], x: torch.Tensor, *, warmup: int,
                      runs: int, rounds: int) -> dict[str, list[float]]:
    """p50 ms of each model per round; rounds alternate models so drift hits all alike."""
    p50: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            p50[name].append(time_model(model, x, warmup=warmup, runs=runs).p50_ms)
    return p50


def run_case(arch: str, batch: int, args: argparse.Namespace) -> dict[str, object]:
    pruned, _, skipped = prune_nm(randomized_model(ModelSpec(arch=arch)), NMPruneConfig())
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224)
    xh = x.cuda().half().contiguous(memory_format=torch.channels_last)
    layer_timing = {"warmup": args.layer_warmup, "iters": args.layer_iters,
                    "repeats": args.layer_repeats, "alg_search": args.alg_search}
    models: dict[str, nn.Module] = {"dense fp16 (cuDNN)": dense_fp16(pruned)}
    reports: dict[str, list[LayerReport]] = {}
    setup_s: dict[str, float] = {}
    for mode in ["auto", "all"] if args.all else ["auto"]:
        t0 = time.perf_counter()
        model, rows = sparsify_2to4(pruned, example=x, mode=mode, **layer_timing)
        setup_s[mode] = time.perf_counter() - t0
        models[f"2:4 {mode}"] = model
        reports[mode] = rows
    with torch.inference_mode():
        ref = models["dense fp16 (cuDNN)"](xh)
        agreement = {name: compare_logits(m(xh), ref) for name, m in models.items()
                     if name.startswith("2:4")}
    p50 = time_side_by_side(models, xh, warmup=args.warmup, runs=args.runs, rounds=args.rounds)
    median = {name: statistics.median(v) for name, v in p50.items()}
    base = median["dense fp16 (cuDNN)"]
    auto = reports["auto"]
    return {
        "model": arch,
        "batch": batch,
        "skipped_by_pruning": skipped,
        "p50_ms_per_round": p50,
        "p50_ms": median,
        "speedup_vs_dense": {name: base / ms for name, ms in median.items()},
        "images_per_s": {name: batch / (ms / 1000.0) for name, ms in median.items()},
        "logits_vs_dense": agreement,
        "layers_sparse": sum(r.used for r in auto),
        "layers_timed": sum(r.sparse_ms is not None for r in auto),
        "layers_total": len(auto),
        "sparsify_s": setup_s,
        "layers": {mode: [asdict(r) for r in rows] for mode, rows in reports.items()},
        "layers_md": {mode: report_markdown(rows) for mode, rows in reports.items()},
    }


def summary_row(case: dict, name: str) -> str:
    """One variant's line of the end-to-end table."""
    ms = case["p50_ms"][name]
    head = (f"| {case['model']} | {case['batch']} | {name} | {ms:.3f} | "
            f"{case['images_per_s'][name]:.0f} | {case['speedup_vs_dense'][name]:.3f}x |")
    agree = case["logits_vs_dense"].get(name)
    if agree is None:  # the dense baseline
        return head + "  |  |  |"
    rows = case["layers"][name.removeprefix("2:4 ")]
    used = f"{sum(r['used'] for r in rows)} of {len(rows)}"
    return head + f" {used} | {agree['max_rel_err']:.1e} | {agree['top1_agree']:.3f} |"


def markdown(env: dict[str, object], settings: dict[str, object],
             cases: list[dict[str, object]]) -> str:
    lines = [
        "# 2:4 sparsity on GPU: cuSPARSELt GEMMs vs cuDNN (fp16, channels_last, 224x224)",
        "",
        f"GPU {env['gpu']} (sm {env['compute_capability']}), torch {env['torch']}, "
        f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, cuSPARSELt {env['cusparselt']}; "
        f"cudnn.benchmark={env['cudnn_benchmark']}.",
        f"Settings: {json.dumps(settings)}",
        "",
        "Random weights, 2:4-pruned with prune.nm (every conv but the 3-channel stem, and "
        "fc); BN folded. End-to-end p50 latency, median over alternating rounds.",
        "",
        "| model | batch | variant | p50 ms | images/s | speedup vs dense | sparse layers "
        "| logits max rel err | top-1 agree |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for c in cases:
        lines += [summary_row(c, name) for name in c["p50_ms"]]  # type: ignore[attr-defined]
    for c in cases:
        for mode, table in c["layers_md"].items():  # type: ignore[union-attr]
            lines += ["", f"## {c['model']}, batch {c['batch']}: per layer ({mode} mode)", "",
                      "Times are ms per call on the layer's real input; speedup is cuDNN "
                      "(cuBLAS for fc) over the 2:4 sparse GEMM.", "", table.rstrip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--runs", type=int, default=30, help="timed calls per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--layer-warmup", type=int, default=5)
    parser.add_argument("--layer-iters", type=int, default=20)
    parser.add_argument("--layer-repeats", type=int, default=5)
    parser.add_argument("--alg-search", action="store_true",
                        help="let cuSPARSELt pick its algorithm per layer (default: alg 0)")
    parser.add_argument("--all", action="store_true",
                        help="also time the model with every eligible layer sparse")
    parser.add_argument("--out", type=Path, default=RESULTS / "sparse24_gpu",
                        help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_sparse24 needs an NVIDIA GPU (CUDA, compute capability 8.0+); this "
              f"torch {torch.__version__} sees none", file=sys.stderr)
        return 2
    try:
        check_2to4_support(torch.float16)
    except UserError as exc:
        print(f"bench_sparse24: {exc}", file=sys.stderr)
        return 2
    # The baseline gets cuDNN's fastest algorithms, as any deployment would.
    torch.backends.cudnn.benchmark = True
    env = gpu_environment()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    cases = []
    for arch in args.models:
        for batch in args.batches:
            t0 = time.perf_counter()
            case = run_case(arch, batch, args)
            cases.append(case)
            print(f"{arch} batch {batch} ({time.perf_counter() - t0:.0f} s): " + ", ".join(
                f"{name} {ms:.2f} ms" for name, ms in case["p50_ms"].items()), flush=True)
            print(case["layers_md"]["auto"], flush=True)
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"environment": env, "settings": settings,
              "cases": [{k: v for k, v in c.items() if k != "layers_md"} for c in cases]}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(env, settings, cases)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
