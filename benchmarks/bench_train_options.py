"""What the training loop's speed options buy on this CPU: the optimizer step per-tensor
against fused, and fp32 against bf16 autocast (``amp: native``), on the quickstart's
ResNet-50 teacher and ResNet-18 student at 28x28, batch 256, channels_last.

Each configuration trains the same network from the same weights on the same batch;
they are timed round-robin (every configuration once per round, the median over rounds)
so that a change of load hits them alike. bf16 runs only where oneDNN has bf16 kernels
(AVX512-BF16 or AMX); elsewhere it says so.

    python benchmarks/bench_train_options.py [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from netshrink.bench.environment import cpu_flags, cpu_name
from netshrink.models import ModelSpec, build_model
from netshrink.train.loop import native_bf16

CONFIGS = {  # name: (fused optimizer, bf16 autocast)
    "fp32, per-tensor AdamW": (False, False),
    "fp32, fused AdamW": (True, False),
    "bf16 autocast, fused AdamW": (True, True),
}


def step_seconds(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, bf16: bool, steps: int) -> float:
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    start = time.perf_counter()
    for _ in range(steps):
        with cast:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = native_bf16(torch.device("cpu"))
    print(f"CPU: {cpu_name()}, flags {' '.join(cpu_flags())}; torch {torch.__version__}, "
          f"kernels {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads; "
          f"oneDNN bf16: {'yes' if bf16 else 'no (bf16 rows skipped)'}")
    for arch in ("resnet50", "resnet18"):
        torch.manual_seed(0)
        base = build_model(ModelSpec(arch=arch, num_classes=10, in_channels=1,
                                     zero_init_residual=True))
        base = base.to(memory_format=torch.channels_last).train()
        x = torch.randn(args.batch_size, 1, 28, 28).contiguous(
            memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch_size,))
        runs = {}
        for name, (fused, cast) in CONFIGS.items():
            if cast and not bf16:
                continue
            model = copy.deepcopy(base)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused or None)
            step_seconds(model, opt, x, y, cast, 2)  # warm-up: kernels picked, state made
            runs[name] = (model, opt, cast, [])
        for _ in range(args.rounds):
            for model, opt, cast, times in runs.values():
                times.append(step_seconds(model, opt, x, y, cast, args.steps))
        first = None
        print(f"{arch}, 1x28x28, batch {args.batch_size}:")
        for name, (*_, times) in runs.items():
            rate = args.batch_size / statistics.median(times)
            first = first or rate
            print(f"  {name:28s} {rate:7.1f} train images/s  ({rate / first:.2f}x)")


if __name__ == "__main__":
    main()
