"""Accuracy vs pruning ratio on Fashion-MNIST for the quickstart's trained ResNet-18.

Methods: unstructured L1 one-shot, unstructured L1 iterative (3 steps, fine-tuning between
steps when --finetune-steps > 0), and channel pruning (L1, fc kept); each at ratios 0.1,
0.3, 0.5, 0.7, 0.9, without fine-tuning and (with --finetune-steps N) after N steps of
fine-tuning through the one training loop. Top-1 on the full 10,000-image test set.
Writes a JSON table and the accuracy-vs-ratio plot beside it.

    netshrink run recipes/quickstart.yaml --out runs/quickstart
    python benchmarks/prune_curves_fashion.py \
        --weights runs/quickstart/stages/01-train/model.safetensors [--finetune-steps 200]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from netshrink.bench import evaluate
from netshrink.data import DataConfig, build_data
from netshrink.prune import MagnitudePruneConfig, MaskHook, prune_magnitude, zero_masks
from netshrink.prune.channel import ChannelPruneConfig, prune_channels
from netshrink.stages.train import FinetuneConfig
from netshrink.store.atomic import atomic_write_text
from netshrink.store.checkpoint import load_model
from netshrink.train.loop import train

RATIOS = [0.1, 0.3, 0.5, 0.7, 0.9]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prune_curves_fashion"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, _, meta = load_model(args.weights)
    data = build_data(DataConfig(name="fashion_mnist", val_size=0, augment=False))

    def top1(m: nn.Module) -> float:
        return evaluate(m, data.test, batch_size=500).top1

    def finetune(m: nn.Module, masks: dict | None = None) -> None:
        cfg = FinetuneConfig(epochs=1, max_steps=args.finetune_steps, lr=0.01)
        hooks = [MaskHook(masks)] if masks else []
        train(m, data, cfg, step_hooks=hooks, log=lambda _: None)  # keep_zeros keeps zeros

    example = torch.zeros(1, meta["in_channels"], meta["image_size"], meta["image_size"])
    methods: dict[str, Callable[[float, bool], nn.Module]] = {
        "unstructured one-shot": lambda r, ft: prune_magnitude(
            model, MagnitudePruneConfig(ratio=r))[0],
        "unstructured iterative (3 steps)": lambda r, ft: prune_magnitude(
            model, MagnitudePruneConfig(ratio=r, steps=3, finetune_epochs=1 if ft else 0),
            train_fn=finetune if ft else None)[0],
        "channel one-shot": lambda r, ft: prune_channels(
            model, ChannelPruneConfig(ratio=r), example_input=example),
    }
    baseline = top1(model)
    print(f"baseline top-1 {baseline:.4f}")
    curves: dict[str, list[tuple[float, float]]] = {}
    variants = [False, True] if args.finetune_steps else [False]
    for label, make in methods.items():
        for ft in variants:
            key = f"{label}{' + fine-tune' if ft else ''}"
            curves[key] = []
            for ratio in RATIOS:
                start = time.perf_counter()
                pruned = make(ratio, ft)
                if ft:
                    finetune(pruned, zero_masks(pruned))
                acc = top1(pruned)
                curves[key].append((ratio, acc))
                print(f"{key:45s} ratio {ratio:.1f}: top-1 {acc:.4f} "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(
        {"weights": str(args.weights), "baseline_top1": baseline,
         "finetune_steps": args.finetune_steps, "curves": curves}, indent=2))
    from netshrink.prune.plots import plot_accuracy_vs_ratio

    plot_accuracy_vs_ratio(curves, args.out.with_suffix(".png"), baseline_top1=baseline)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
