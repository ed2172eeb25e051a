"""Sensitivity-guided vs uniform layer-wise pruning at the same total sparsity (Fashion-MNIST).

Scans the quickstart's trained ResNet-18 layer by layer (each layer alone pruned 90% by
magnitude, top-1 on 2,000 test images), allocates per-layer ratios from the scan so the
total number of zeroed conv/linear weights equals the uniform ratio's exactly, and compares
both on the full 10,000-image test set, without fine-tuning. Writes the scan's bar plot.

    python benchmarks/prune_allocation_fashion.py \\
        --weights runs/quickstart/stages/01-train/model.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from netshrink.bench import evaluate
from netshrink.data import DataConfig, build_data
from netshrink.prune import MagnitudePruneConfig, prune_magnitude, sparsity_table
from netshrink.prune.plots import plot_sensitivity
from netshrink.prune.search import allocate_by_sensitivity, prune_with_allocation
from netshrink.prune.sensitivity import sensitivity_scan
from netshrink.store.atomic import atomic_write_text
from netshrink.store.checkpoint import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/prune_allocation_fashion"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, _, _ = load_model(args.weights)
    data = build_data(DataConfig(name="fashion_mnist", val_size=0, augment=False))
    rows = sensitivity_scan(model, data.test, method="magnitude", ratio=0.9, max_images=2000,
                            split_name="test")
    plot_sensitivity(rows, args.out.with_suffix(".png"), ratio=0.9)
    results = []
    for target in args.targets:
        uniform, _ = prune_magnitude(model, MagnitudePruneConfig(ratio=target))
        allocation = allocate_by_sensitivity(model, rows, target)
        guided = prune_with_allocation(model, allocation)
        zeros = [sparsity_table(m)[-1]["zeros"] for m in (uniform, guided)]
        accs = [evaluate(m, data.test, batch_size=500).top1 for m in (uniform, guided)]
        results.append({"target": target, "zeros_uniform": zeros[0], "zeros_guided": zeros[1],
                        "top1_uniform": accs[0], "top1_guided": accs[1],
                        "allocation": allocation})
        print(f"sparsity {target:.1f}: uniform {accs[0] * 100:.2f}%  guided {accs[1] * 100:.2f}% "
              f"(zeros {zeros[0]:,} vs {zeros[1]:,})", flush=True)
    atomic_write_text(args.out.with_suffix(".json"),
                      json.dumps({"scan": rows, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
