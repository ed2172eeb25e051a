"""Channel pruning at ratio 0.5: params, MACs and CPU latency against the dense model.

Masked variants are timed beside them (50% unstructured magnitude, 2:4): they zero weights
without removing work, and this shows what that buys on a CPU.

For ResNet-50 (ImageNet stem, 224x224) and ResNet-18 (CIFAR stem, 32x32): prune channels
with netshrink (Torch-Pruning's dependency graph, L1, fc kept), save the pruned model to a
safetensors file, reload it and check its outputs equal the ones before saving, then time
the dense and the reloaded pruned model round-robin in this one process (same inputs, same
threads, warm-up first), so the ratio is measured side by side.

    python benchmarks/bench_channel_pruning.py [--ratio 0.5] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from netshrink.bench import count_macs, count_params
from netshrink.models import ModelSpec, randomized_model
from netshrink.prune import MagnitudePruneConfig, NMPruneConfig, prune_magnitude, prune_nm
from netshrink.prune.channel import ChannelPruneConfig, prune_channels
from netshrink.store.checkpoint import load_model, save_model

CASES = [
    ("resnet50 imagenet 3x224x224", ModelSpec(arch="resnet50", num_classes=1000), [3, 224, 224]),
    ("resnet18 cifar 3x32x32", ModelSpec(arch="resnet18", num_classes=10, stem="cifar"),
     [3, 32, 32]),
]


def call_ms(model: nn.Module, x: torch.Tensor, calls: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for _ in range(calls):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="timed batch-1 calls per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, channel ratio {args.ratio}, L1, fc kept")
    print("| model | params dense → pruned | MACs dense → pruned | b1 p50 dense | b1 p50 pruned |"
          " latency speed-up | reload equal |")
    print("|---|---|---|---|---|---|---|")
    masked: list[str] = []
    for name, spec, shape in CASES:
        dense = randomized_model(spec)
        example = torch.zeros(1, *shape)
        pruned = prune_channels(dense, ChannelPruneConfig(ratio=args.ratio), example_input=example)
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pruned.safetensors"
            save_model(pruned, spec.model_copy(update={"pruned": True}), path, meta={})
            reloaded, _, _ = load_model(path)
        with torch.inference_mode():
            equal = torch.equal(pruned(x), reloaded(x))
        params = count_params(dense)[0], count_params(reloaded)[0]
        macs = count_macs(dense, shape), count_macs(reloaded, shape)
        timed = {
            "dense": dense,
            "channel 0.5": reloaded,
            "unstructured 50%": prune_magnitude(dense, MagnitudePruneConfig(ratio=0.5))[0],
            "2:4": prune_nm(dense, NMPruneConfig())[0],
        }
        for model in timed.values():  # warm-up: oneDNN picks and caches its kernels
            call_ms(model, x, 5)
        ms: dict[str, list[float]] = {label: [] for label in timed}
        for _ in range(args.rounds):
            for label, model in timed.items():
                ms[label] += call_ms(model, x, args.calls)
        p50 = {label: statistics.median(values) for label, values in ms.items()}
        d50 = p50["dense"]
        print(f"| {name} | {params[0] / 1e6:.2f} M → {params[1] / 1e6:.2f} M "
              f"({params[0] / params[1]:.2f}x) | {macs[0] / 1e6:,.0f} M → {macs[1] / 1e6:,.0f} M "
              f"({macs[0] / macs[1]:.2f}x) | {d50:.2f} ms | {p50['channel 0.5']:.2f} ms | "
              f"{d50 / p50['channel 0.5']:.2f}x | {'yes' if equal else 'NO'} |")
        masked.append(f"| {name} | " + " | ".join(
            f"{p50[label]:.2f} ms ({d50 / p50[label]:.2f}x)" for label in timed) + " |")
    print("\nBatch-1 p50 of masked models in the same rounds (speed-up vs dense):\n")
    print("| model | dense | channel 0.5 | unstructured 50% | 2:4 |")
    print("|---|---|---|---|---|")
    print("\n".join(masked))


if __name__ == "__main__":
    main()
