"""``compress`` on a user's own CNN (not a ResNet) trained by the user's own loop, from
Python with DataLoaders and from the command line with a data factory, against the same
model's dense NNCF INT8 in OpenVINO, timed side by side in one process.

1. ``benchmarks/user_cnn.py``'s MobileNetV2-style CNN trained on Fashion-MNIST by a plain
   PyTorch loop (SGD, cosine) on 55,000 images; 5,000 held out as validation; the 10,000
   test images only report.
2. ``netshrink.compress(model, train=, val=, test=, factory=...)`` (Python) and
   ``netshrink compress --weights user_cnn.safetensors --trust user_cnn:make_cnn --data
   user_cnn:fashion_data`` (CLI), both at the default flags with a 1-point budget.
3. The dense model's NNCF INT8 OpenVINO IR (``netshrink.quantize(..., PTQConfig(runtime=
   "openvino"))``) and its float ONNX.
4. Every file opened where it runs, test top-1 evaluated on the same test loader, batch-1
   latency and batch-32 throughput timed round-robin (each round times every file in
   turn, so a change of load hits them all alike); the table gives the median of rounds.

    python benchmarks/compress_user_cnn.py --out runs/user-cnn [--epochs 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_compress import Entry, run_entry, time_round  # noqa: E402
from user_cnn import fashion_data, make_cnn  # noqa: E402

import netshrink  # noqa: E402
from netshrink.bench.environment import environment  # noqa: E402
from netshrink.models.factory import trusting  # noqa: E402

RESULTS = HERE / "results"
FACTORY = "user_cnn:make_cnn"
DATA_FACTORY = "user_cnn:fashion_data"


def train_own_loop(model: nn.Module, train: DataLoader, epochs: int, log) -> None:
    """The user's own training loop: nothing of netshrink's."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=4e-5)
    steps = epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for epoch in range(epochs):
        started, total = time.perf_counter(), 0.0
        for images, labels in train:
            loss = nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        log(f"epoch {epoch + 1}/{epochs}: loss {total / len(train):.4f} "
            f"({time.perf_counter() - started:.0f} s)")
    model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--max-steps", type=int,
                        help="compress: at most this many steps per fine-tuning (both runs); "
                             "default: its own (whole epochs)")
    parser.add_argument("--name", default="compress_user_cnn")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    def log(line: str) -> None:
        print(line, flush=True)

    splits = fashion_data()
    train = DataLoader(splits["train"], batch_size=128, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(splits["val"], batch_size=256)
    test = DataLoader(splits["test"], batch_size=256)
    weights = out / "user_cnn.safetensors"
    kwargs = {"width": args.width}
    torch.manual_seed(0)
    model = make_cnn(**kwargs)
    if weights.is_file():
        model = netshrink.load(weights, trust=[FACTORY]).model
    else:
        train_own_loop(model, train, args.epochs, log)
        dense = netshrink.Compressed(model=model, input_shape=[1, 28, 28], meta={
            "dataset": "fashion_mnist", "class_names": splits["class_names"],
            "image_size": 28, "in_channels": 1})
        dense.save(weights, factory=FACTORY, factory_kwargs=kwargs)
    timings = {}
    started = time.perf_counter()
    limit = {"max_steps": args.max_steps} if args.max_steps else {}
    py = netshrink.compress(model, out / "python", train=train, val=val, test=test,
                            factory=FACTORY, factory_kwargs=kwargs,
                            budget_points=args.budget, **limit)
    timings["python compress"] = time.perf_counter() - started
    files = {"compress (Python, DataLoaders)": py.deployable}
    if not args.skip_cli:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE),
                                                              os.environ.get("PYTHONPATH", "")])}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "netshrink", "compress", "--weights",
                        str(weights), "--trust", FACTORY, "--data", DATA_FACTORY,
                        "--budget-points", str(args.budget), "--out", str(out / "cli"),
                        *(["--max-steps", str(args.max_steps)] if args.max_steps else [])],
                       env=env, check=True)
        timings["cli compress"] = time.perf_counter() - started
        files["compress (CLI, data factory)"] = run_entry(out / "cli" / "chosen", "cli").file
    nncf = netshrink.quantize(model, netshrink.PTQConfig(runtime="openvino"),
                              calibration=train, out=out / "nncf")
    files["dense NNCF INT8 (OpenVINO)"] = nncf.file
    files["dense fp32 (ONNX Runtime)"] = netshrink.export(
        model, out / "dense.onnx", example_input=torch.zeros(1, 1, 28, 28)).file

    entries = []
    for label, file in files.items():
        loaded = netshrink.load(file, trust=[FACTORY])
        top1 = loaded.evaluate(test).top1
        entries.append(Entry(label, Path(file), top1, None))
        log(f"{label}: {file}, test top-1 {top1:.2%}")
    with trusting([FACTORY]):  # the compressed files name the user's factory
        for r in range(args.rounds):
            log(f"round {r + 1} of {args.rounds}")
            time_round(entries, 2, args.batch)
    write_results(args, entries, timings)
    return 0


def write_results(args: argparse.Namespace, entries: list[Entry],
                  timings: dict[str, float]) -> None:
    env = environment(threads=2, seed=0)
    nncf = next(e for e in entries if e.label.startswith("dense NNCF"))
    p50 = {e.label: statistics.median(e.p50) for e in entries}
    thr = {e.label: statistics.median(e.thr) for e in entries}
    lines = [f"# {args.name}", "",
             f"{env.cpu}, 2 threads, torch {env.versions.get('torch')}; one process, "
             f"{args.rounds} rounds round-robin (median of the rounds' medians). The user's "
             f"CNN (`benchmarks/user_cnn.py`, width {args.width}) trained {args.epochs} "
             "epochs by a plain PyTorch loop; compress at its default flags"
             + (f" but at most {args.max_steps} steps per fine-tuning" if args.max_steps
                else "") + f", budget {args.budget:g} point(s) of validation top-1. Test "
             "top-1 on the 10,000 test images, evaluated here for every file.", "",
             "| file | test top-1 % | size B | smaller than NNCF INT8 | b1 p50 ms | "
             "faster than NNCF INT8 (b1) | b32 img/s | noisy rounds |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        lines.append(f"| {e.label} | {e.top1 * 100:.2f} | {e.size:,} | "
                     f"{nncf.size / e.size:.2f}x | {p50[e.label]:.3f} | "
                     f"{p50[nncf.label] / p50[e.label]:.2f}x | {thr[e.label]:,.0f} | "
                     f"{e.noisy} of {args.rounds} |")
    lines += ["", "Search time: " + ", ".join(f"{k} {v / 60:.1f} min"
                                              for k, v in timings.items()) + ".",
              "", "Reproduce: `python benchmarks/compress_user_cnn.py --out runs/user-cnn"
              + (f" --max-steps {args.max_steps}" if args.max_steps else "") + "`."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"entries": [{"label": e.label, "file": str(e.file), "top1": e.top1, "size": e.size,
                      "p50_ms": e.p50, "images_per_s": e.thr, "noisy": e.noisy}
                     for e in entries], "timings_s": timings,
         "environment": env.model_dump(mode="json")}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
