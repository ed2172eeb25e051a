"""Training speed of ResNet-18 at 28x28 with and without the one-pixel-output matmul path.

netshrink's ``Conv2d`` computes, in training, a conv whose output is a single pixel as a
matmul over the taps that touch real pixels (see ``netshrink.models.resnet.Conv2d``). This
script times training steps of the same network built both ways, round-robin in one
process with the same inputs, and prints images/s and the ratio.

    python benchmarks/bench_train_speed.py [--batch-size 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from bench_train_options import step_seconds  # same folder: the script's sys.path[0]
from torch import nn

from netshrink.models import ModelSpec, build_model


def with_plain_convs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose convs are torch's own ``nn.Conv2d`` with the same weights."""
    plain = copy.deepcopy(model)
    for module in list(plain.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:
                swap = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                 stride=child.stride, padding=child.padding,
                                 bias=child.bias is not None)
                swap.load_state_dict(child.state_dict())
                setattr(module, child_name, swap)
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = build_model(ModelSpec(arch="resnet18", num_classes=10, in_channels=1))
    models = {"torch nn.Conv2d": with_plain_convs(ours), "netshrink Conv2d": ours}
    for m in models.values():
        m.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    times: dict[str, list[float]] = {name: [] for name in models}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                  for name, m in models.items()}
    for name, m in models.items():  # warm-up: oneDNN picks and caches its kernels
        step_seconds(m.train(), optimizers[name], x, y, False, 2)
    for _ in range(args.rounds):
        for name, m in models.items():
            times[name].append(step_seconds(m, optimizers[name], x, y, False, args.steps))
    print(f"ResNet-18, ImageNet stem, 1x28x28, batch {args.batch_size}, {args.threads} threads, "
          f"torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}")
    rate = {n: args.batch_size / statistics.median(t) for n, t in times.items()}
    for name, r in rate.items():
        spread = [args.batch_size / t for t in times[name]]
        print(f"  {name:18s} {r:7.1f} train images/s (rounds {min(spread):.1f}-{max(spread):.1f})")
    print(f"  speed-up: {rate['netshrink Conv2d'] / rate['torch nn.Conv2d']:.2f}x")


if __name__ == "__main__":
    main()
