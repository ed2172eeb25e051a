"""One fine-tuning epoch of ResNet-18 on Fashion-MNIST-format data, in 1 and in 2
data-parallel processes (gloo, this machine): wall time of each, and how far apart the
two final models are.

Both start from the same weights and take the same global batches (``batch_size`` is
the global batch; each of the 2 processes trains on half of it), with ``sync_bn`` so
batch norm sees the global batch: the weights agree up to float rounding, amplified by
the training. How much the training amplifies rounding is shown by a third run: one
process with the 2-process run's threads per process, against one with all cores (a
fresh ResNet-18 through the ImageNet stem at 28x28 amplifies it a lot: its layer4 maps
are 1x1). Each process of a run gets ``cores / processes`` threads.

    python benchmarks/bench_ddp.py [--data-dir DIR] [--images 60000] [--batch-size 256]
    python benchmarks/bench_ddp.py --quick [--arch resnet_tiny]  # tiny: it works, not speed
"""

from __future__ import annotations

import argparse
import gzip
import os
import socket
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from netshrink.data import DataConfig, build_data
from netshrink.models import ModelSpec, build_model
from netshrink.train.config import TrainConfig
from netshrink.train.loop import train

DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")


def write_synthetic(root: Path, n_train: int, n_test: int = 64) -> Path:
    """Random images in Fashion-MNIST's IDX files (when the real files are absent)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays = {"images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  "labels-idx1-ubyte": rng.integers(0, 10, n, dtype=np.uint8)}
        for name, array in arrays.items():
            header = struct.pack(">HBB", 0, 0x08, array.ndim)
            header += struct.pack(f">{array.ndim}I", *array.shape)
            (root / f"{prefix}-{name}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return root


def worker(rank: int, world: int, threads: int, port: int, args: argparse.Namespace,
           start: Path, out: Path) -> None:
    """One process of a ``world``-process fine-tuning: times its epoch, rank 0 saves."""
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    data = build_data(DataConfig(name="fashion_mnist", root=args.data_dir, val_size=0,
                                 calib_size=16, train_limit=args.images, test_limit=64))
    model = build_model(ModelSpec(arch=args.arch, num_classes=10, in_channels=1))
    model.load_state_dict(torch.load(start, weights_only=True))
    cfg = TrainConfig(epochs=1, lr=0.01, warmup_epochs=0, batch_size=args.batch_size,
                      eval_every=0, sync_bn=True)
    if world > 1:
        dist.barrier()  # everyone loaded: time the epoch alone
    began = time.perf_counter()
    train(model, data, cfg, progress=False, log=lambda _: None)
    seconds = time.perf_counter() - began
    if rank == 0:
        torch.save({"state": model.state_dict(), "seconds": seconds}, out)
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(world: int, threads: int, args: argparse.Namespace, start: Path, folder: Path) -> dict:
    """Fine-tune in ``world`` processes of ``threads`` threads each; rank 0's result."""
    out = folder / f"world{world}-threads{threads}.pt"
    mp.spawn(worker, args=(world, threads, free_port(), args, start, out), nprocs=world,
             join=True)
    return torch.load(out, weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    """The largest |a - b| over the float tensors (BN's step counters are integers)."""
    return max(float((b[k].double() - v.double()).abs().max())
               for k, v in a.items() if v.is_floating_point())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--images", type=int, default=None,
                        help="training images (default: all of the training split)")
    parser.add_argument("--batch-size", type=int, default=256, help="the global batch")
    parser.add_argument("--quick", action="store_true",
                        help="256 images, batch 64: a check that it works, not a speed figure")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch_size = 256, 64
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not (args.data_dir / "train-images-idx3-ubyte.gz").exists() and args.quick:
            args.data_dir = write_synthetic(folder / "fashion", args.images)
            print(f"no Fashion-MNIST in {DEFAULT_DATA}: random images in its format")
        torch.manual_seed(0)
        start = folder / "start.pt"
        torch.save(build_model(ModelSpec(arch=args.arch, num_classes=10,
                                         in_channels=1)).state_dict(), start)
        cores = os.cpu_count() or 1
        one = run(1, cores, args, start, folder)
        two = run(2, max(1, cores // 2), args, start, folder)
        floor = run(1, max(1, cores // 2), args, start, folder)
    largest = max(float(v.abs().max()) for v in one["state"].values() if v.is_floating_point())
    label = "QUICK/TINY setting (not a speed figure): " if args.quick else ""
    print(f"{label}{args.arch}, one fine-tuning epoch of {args.images or 'all'} images, "
          f"global batch {args.batch_size}, sync_bn, {cores} cores")
    print(f"1 process x {cores} threads:   {one['seconds']:.2f} s")
    print(f"2 processes x {max(1, cores // 2)} threads: {two['seconds']:.2f} s "
          f"({one['seconds'] / two['seconds']:.2f}x)")
    print(f"1 process x {max(1, cores // 2)} threads:   {floor['seconds']:.2f} s")
    print(f"max |w(2 processes) - w(1 process)|           = "
          f"{max_difference(one['state'], two['state']):.2e} (largest |w| {largest:.2f})")
    print(f"max |w(1 process, {max(1, cores // 2)} threads) - w(1 process)| = "
          f"{max_difference(one['state'], floor['state']):.2e} (rounding, amplified)")


if __name__ == "__main__":
    main()
