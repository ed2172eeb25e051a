"""INT8 on real CPU runtimes against torch eager FP32, measured side by side in one process.

For ResNet-18 (CIFAR stem, 32x32) and ResNet-50 (ImageNet stem, 224x224): export the model
with netshrink, quantize it with every quantizer netshrink offers, open each file in each
runtime that can run it, and time all of them round-robin (batch-1 latency p50/p90 and
batch-32 throughput) with the same inputs and threads. Every variant's logits are compared
with torch FP32 (signal-to-noise ratio) so a fast-but-broken variant shows. Variants that
lose (dynamic INT8, int8 activations, fp16/bf16 on a CPU without them) are kept in the table.

Random weights with random BatchNorm statistics; calibration on random images (the
speed of an INT8 kernel does not depend on the values; accuracy is in the Fashion-MNIST
table of benchmarks/quant_accuracy_fashion.py).

    python benchmarks/bench_int8_runtimes.py [--rounds 3] [--threads 2] [--only resnet18]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch_int8  # benchmarks/torch_int8.py (torchao is optional, not a netshrink dependency)
from torch import nn

from netshrink.bench.environment import environment
from netshrink.export import export_onnx
from netshrink.models import ModelSpec, randomized_model
from netshrink.quant.ptq import PTQConfig, quantize_dynamic_onnx, quantize_onnx, quantize_openvino
from netshrink.runtime import model_stats, open_runtime

RESULTS = Path(__file__).parent / "results"
CASES = {
    "resnet18": ("ResNet-18, CIFAR stem, 3x32x32",
                 ModelSpec(arch="resnet18", num_classes=10, stem="cifar"), [3, 32, 32]),
    "resnet50": ("ResNet-50, ImageNet stem, 3x224x224",
                 ModelSpec(arch="resnet50", num_classes=1000), [3, 224, 224]),
}


class Bf16(nn.Module):
    """torch eager with bf16 autocast and channels_last (the fast bf16 path on CPUs with it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x.contiguous(memory_format=torch.channels_last)).float()


def variants(model: nn.Module, shape: list[int], tmp: Path, threads: int, batch: int = 32,
             setup_s: dict[str, float] | None = None
             ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Every runtime x format, each a callable on a float32 batch.

    ``setup_s`` (if given) receives setup times in seconds of the variants that compile.
    """
    stats = model_stats(model, shape)
    fp32 = export_onnx(model, tmp / "fp32.onnx", input_shape=shape)
    gen = np.random.default_rng(0)
    calib = [gen.standard_normal((8, *shape), dtype=np.float32) for _ in range(4)]
    files = {
        "u8s8_pc": quantize_onnx(fp32, tmp / "u8s8_pc.onnx", calib, PTQConfig()),
        "u8s8_pt": quantize_onnx(fp32, tmp / "u8s8_pt.onnx", calib, PTQConfig(per_channel=False)),
        "s8s8_pc": quantize_onnx(fp32, tmp / "s8s8_pc.onnx", calib, PTQConfig(activations="int8")),
        "dynamic": quantize_dynamic_onnx(fp32, tmp / "dynamic.onnx"),
    }
    (tmp / "ov").mkdir()
    nncf_xml = quantize_openvino(fp32, tmp / "ov" / "model.xml", calib,
                                 PTQConfig(runtime="openvino"))

    def ort(path: Path) -> nn.Module:
        return open_runtime(path, "onnxruntime", stats=stats, threads=threads)

    def ov(path: Path, precision: str = "fp32") -> nn.Module:
        return open_runtime(path, "openvino", stats=stats, threads=threads, precision=precision)

    fns = {
        "torch eager fp32": model,
        "torch eager bf16 autocast": Bf16(copy.deepcopy(model)),
        "ONNX Runtime fp32": ort(fp32),
        "ONNX Runtime INT8 QDQ u8/s8 per-channel (netshrink default)": ort(files["u8s8_pc"]),
        "ONNX Runtime INT8 QDQ u8/s8 per-tensor": ort(files["u8s8_pt"]),
        "ONNX Runtime INT8 QDQ s8/s8 (int8 activations)": ort(files["s8s8_pc"]),
        "ONNX Runtime dynamic INT8": ort(files["dynamic"]),
        "OpenVINO fp32": ov(fp32),
        "OpenVINO bf16 hint": ov(fp32, "bf16"),
        "OpenVINO INT8 (netshrink's ONNX QDQ file)": ov(files["u8s8_pc"], "int8"),
        "OpenVINO INT8 (NNCF)": ov(nncf_xml, "int8"),
    }
    missing = torch_int8.available()
    if missing is None:
        compiled, times = torch_int8.torch_int8(copy.deepcopy(model), shape, calib,
                                                warm_batches=(1, batch))
        print(f"{torch_int8.VARIANT}: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()),
              flush=True)
        if setup_s is not None:
            setup_s.update({f"torch INT8 {k}": v for k, v in times.items()})
        fns[torch_int8.VARIANT] = compiled
    else:
        print(f"skipping {torch_int8.VARIANT}: torchao does not import ({missing})", flush=True)
    return fns


def call_ms(fn: Callable[[torch.Tensor], object], x: torch.Tensor, calls: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for _ in range(calls):
            start = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - start) * 1000)
    return times


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).pow(2).mean().item()
    return float("inf") if noise == 0 else 10 * np.log10(ref.pow(2).mean().item() / noise)


def bench_case(key: str, rounds: int, threads: int, b1_calls: int, batch: int) -> dict:
    title, spec, shape = CASES[key]
    model = randomized_model(spec)
    gen = torch.Generator().manual_seed(1)
    one = torch.randn(1, *shape, generator=gen)
    many = torch.randn(batch, *shape, generator=gen)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        setup_s: dict[str, float] = {}
        fns = variants(model, shape, Path(tmp), threads, batch, setup_s)
        with torch.inference_mode():
            ref = model(many)
        snr = {name: snr_db(ref, fn(many).float()) for name, fn in fns.items()}
        # Calls per timing window: enough for a stable median, few for slow variants.
        many_calls = {}
        for name, fn in fns.items():
            for _ in range(2):
                fn(one)
                fn(many)
            per = statistics.median(call_ms(fn, many, 2))
            many_calls[name] = int(min(20, max(3, 3000 / per)))
        b1: dict[str, list[float]] = {n: [] for n in fns}
        bn: dict[str, list[float]] = {n: [] for n in fns}
        for r in range(rounds):
            for name, fn in fns.items():  # round-robin: drift hits every variant alike
                b1[name] += call_ms(fn, one, b1_calls)
                bn[name] += call_ms(fn, many, many_calls[name])
            print(f"{key}: round {r + 1}/{rounds} done", flush=True)
    base = "torch eager fp32"
    rows = []
    for name in fns:
        p50 = statistics.median(b1[name])
        p90 = float(np.percentile(b1[name], 90))
        ips = batch / (statistics.median(bn[name]) / 1000)
        rows.append({"variant": name, "b1_p50_ms": p50, "b1_p90_ms": p90, "img_s": ips,
                     "snr_db": snr[name], "b1_calls": len(b1[name]), "bn_calls": len(bn[name])})
    ref_row = next(r for r in rows if r["variant"] == base)
    for row in rows:
        row["latency_ratio"] = row["b1_p50_ms"] / ref_row["b1_p50_ms"]
        row["throughput_ratio"] = row["img_s"] / ref_row["img_s"]
    return {"case": title, "batch": batch, "threads": threads, "rounds": rounds, "rows": rows,
            "setup_s": setup_s}


def to_markdown(results: list[dict], env: dict) -> str:
    lines = ["# INT8 runtimes against torch eager FP32 (CPU)", "",
             f"Machine: {env['cpu']}; threads {results[0]['threads']}; "
             f"versions: {', '.join(f'{k} {v}' for k, v in sorted(env['versions'].items()))}.",
             "Targets (issue 4): INT8 batch-1 latency <= 0.25x torch eager FP32, batch-32 "
             "throughput >= 3.5x. SNR: logits of each variant against torch FP32 on the same "
             "batch (random weights), in dB.", "",
             "Reproduce: `python benchmarks/bench_int8_runtimes.py`", ""]
    for res in results:
        lines += [f"## {res['case']}", "",
                  f"{res['rounds']} round-robin rounds; batch {res['batch']} for throughput."
                  + "".join(f" {k}: {v:.1f} s." for k, v in res.get("setup_s", {}).items()),
                  "",
                  "| variant | b1 p50 ms | b1 p90 ms | latency vs torch fp32 | "
                  f"img/s @ {res['batch']} | throughput vs torch fp32 | SNR dB |",
                  "|:---|---:|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            lines.append(f"| {r['variant']} | {r['b1_p50_ms']:.2f} | {r['b1_p90_ms']:.2f} | "
                         f"{r['latency_ratio']:.3f}x | {r['img_s']:.1f} | "
                         f"{r['throughput_ratio']:.2f}x | {r['snr_db']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--b1-calls", type=int, default=15)
    parser.add_argument("--only", choices=sorted(CASES), action="append")
    parser.add_argument("--out", type=Path, default=RESULTS / "int8_runtimes")
    args = parser.parse_args()
    results = [bench_case(k, args.rounds, args.threads, args.b1_calls, args.batch)
               for k in (args.only or list(CASES))]
    env = environment(device="cpu", threads=args.threads, seed=0).model_dump()
    text = to_markdown(results, env)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "results": results},
                                                         indent=2))
    print(text)


if __name__ == "__main__":
    main()
