"""Benchmark netshrink's ResNets with ``netshrink.bench.measure``, repeated in one process.

Measures ResNet-18 (CIFAR stem, 10 classes, 3x32x32) and ResNet-50 (ImageNet stem, 1000
classes, 3x224x224) ``--repeats`` times each and reports batch-1 latency (p50, p90),
batch-N throughput and peak memory, with the run-to-run spread across repeats (min, max,
coefficient of variation): the spread says how far apart two measurements of the *same*
model can land on this machine, so how big a speed-up must be before it means anything.

Writes ``bench_resnets.json`` (every Measurement record) and ``bench_resnets.md`` (the
table and the environment) to ``--out`` (default ``benchmarks/results/``).

    python benchmarks/bench_resnets.py                  # ~2-4 min on 2 cores
    python benchmarks/bench_resnets.py --quick          # resnet_tiny, seconds: checks it works
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from netshrink.bench import Measurement, MeasureOptions, measure
from netshrink.models import ModelSpec, build_model

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    name: str
    spec: ModelSpec
    input_shape: list[int]
    results: list[Measurement] = field(default_factory=list)


CASES = [
    Case("resnet18 cifar", ModelSpec(arch="resnet18", num_classes=10, stem="cifar"), [3, 32, 32]),
    Case(
        "resnet50 imagenet",
        ModelSpec(arch="resnet50", num_classes=1000, stem="imagenet"),
        [3, 224, 224],
    ),
]
QUICK_CASES = [
    Case(
        "resnet_tiny cifar",
        ModelSpec(arch="resnet_tiny", num_classes=10, stem="cifar"),
        [3, 32, 32],
    ),
]


@dataclass(frozen=True)
class Spread:
    """One metric across repeats."""

    mean: float
    min: float
    max: float
    cv: float  # coefficient of variation: sample std / mean (0 with one repeat)

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(mean, min(values), max(values), std / mean if mean else 0.0)

    def cell(self, fmt: str) -> str:
        return f"{self.mean:{fmt}} ({self.min:{fmt}}–{self.max:{fmt}}, CV {self.cv * 100:.1f}%)"


def _spreads(results: list[Measurement]) -> dict[str, Spread]:
    out: dict[str, Spread] = {}
    lat = [r.latency for r in results if r.latency is not None]
    thr = [r.throughput for r in results if r.throughput is not None]
    if lat:
        out["p50_ms"] = Spread.of([x.p50_ms for x in lat])
        out["p90_ms"] = Spread.of([x.p90_ms for x in lat])
    if thr:
        out["images_per_s"] = Spread.of([x.images_per_s for x in thr])
    mem = [r.peak_memory_mb for r in results if r.peak_memory_mb is not None]
    if mem:
        out["peak_memory_mb"] = Spread.of(mem)
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per model (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="throughput batch (default 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--min-seconds", type=float, default=2.0,
                   help="time latency and throughput each for at least this long (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="resnet_tiny only, few runs: checks the script works in seconds")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.batch_size < 1:
        p.error("--repeats, --threads and --batch-size must be at least 1")
    return args


def _markdown(
    cases: list[Case], args: argparse.Namespace, seconds: float, min_seconds: float | None
) -> str:
    env = cases[0].results[0].environment
    lines = [
        "# ResNet benchmark (`benchmarks/bench_resnets.py`)",
        "",
        f"{args.repeats} repeats per model in one process; batch-1 latency and batch-"
        f"{args.batch_size} throughput per repeat are percentiles over that repeat's timed "
        "calls. Cells: mean over repeats (min–max over repeats, coefficient of variation). "
        f"Total wall time {seconds:.0f} s.",
        "",
        "| model | input | params | MMACs | batch-1 p50 ms | batch-1 p90 ms "
        f"| batch-{args.batch_size} img/s | peak MiB |",
        "|---|---|---:|---:|---|---|---|---|",
    ]
    for case in cases:
        first = case.results[0]
        s = _spreads(case.results)
        macs = f"{first.macs / 1e6:,.1f}" if first.macs else "–"
        cells = [
            s[k].cell(fmt) if k in s else "–"
            for k, fmt in (("p50_ms", ".2f"), ("p90_ms", ".2f"), ("images_per_s", ".1f"),
                           ("peak_memory_mb", ".0f"))
        ]
        lines.append(
            f"| {case.name} | {'x'.join(map(str, case.input_shape))} | {first.params:,} "
            f"| {macs} | {' | '.join(cells)} |"
        )
    lat = cases[0].results[0].latency
    thr = cases[0].results[0].throughput
    lines += [
        "",
        "## Settings",
        "",
        f"- timed calls per repeat: batch 1 ≥ {lat.runs if lat else '–'} after "
        f"{lat.warmup if lat else '–'} warm-up; batch {args.batch_size} ≥ "
        f"{thr.runs if thr else '–'} after {thr.warmup if thr else '–'} warm-up"
        + (f" (extended to {min_seconds} s each)" if min_seconds else ""),
        f"- memory: peak {first.memory_kind} over two batch-{args.batch_size} calls",
        "",
        "## Environment",
        "",
        f"- CPU: {env.cpu}",
        f"- GPU: {env.gpu or '–'} (device {env.device})",
        f"- torch threads: {env.threads}; seed {env.seed}",
        f"- Python {env.python}; " + ", ".join(f"{k} {v}" for k, v in env.versions.items()),
        f"- platform: {env.platform}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cases = QUICK_CASES if args.quick else CASES
    # --quick checks the plumbing, not the numbers: the fewest calls that fill every field.
    timing = (
        {"warmup": 1, "latency_runs": 5, "throughput_warmup": 1, "throughput_runs": 2,
         "min_seconds": None}
        if args.quick
        else {"min_seconds": args.min_seconds}
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            torch.manual_seed(0)
            model = build_model(case.spec).eval()
            # Saved once so the record carries the on-disk size like a recipe run's does.
            weights = Path(tmp) / f"{case.spec.arch}.safetensors"
            save_file(model.state_dict(), str(weights))
            for repeat in range(args.repeats):
                options = MeasureOptions(device=args.device, threads=args.threads,
                                         seed=repeat, batch_size=args.batch_size, **timing)
                m = measure(model, input_shape=case.input_shape, file=weights, run_dir=tmp,
                            options=options)
                case.results.append(m)
                lat, thr = m.latency, m.throughput
                assert lat is not None and thr is not None
                print(
                    f"[{case.name} {repeat + 1}/{args.repeats}] batch 1 p50 {lat.p50_ms:.2f} ms "
                    f"p90 {lat.p90_ms:.2f} ms ({lat.runs} runs); batch {args.batch_size} "
                    f"{thr.images_per_s:.1f} img/s ({thr.runs} runs); "
                    f"peak {m.peak_memory_mb or 0:.0f} MiB",
                    flush=True,
                )
    seconds = time.perf_counter() - start

    md = _markdown(cases, args, seconds, timing["min_seconds"])  # type: ignore[arg-type]
    print()
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_resnets_quick" if args.quick else "bench_resnets"
    payload = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": seconds,
        "cases": [
            {
                "name": case.name,
                "spec": case.spec.model_dump(),
                "input_shape": case.input_shape,
                "spread": {k: vars(v) for k, v in _spreads(case.results).items()},
                "measurements": [r.model_dump() for r in case.results],
            }
            for case in cases
        ],
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(md)
    print(f"wrote {args.out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
