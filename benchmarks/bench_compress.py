"""The file ``netshrink compress`` chose against every study cell within the same accuracy
budget and against the dense model quantized by NNCF for OpenVINO, timed side by side in
one process.

Every deployable file (the compress pick, each study cell's final file, the dense model's
NNCF INT8 OpenVINO IR; for an INT8 ONNX stage its packed ``.nspk``, the smaller file that
runs the same) is opened where it runs and timed round-robin: in each round every
file gets its batch-1 latency and batch-N throughput timing in turn, so a change of load
on the machine hits them all alike; the table gives the median over rounds. Top-1 comes
from the records the runs wrote (the test split, as each run measured it); a study cell is
"within the budget" when its top-1 is at most ``--budget`` points below its own study's
reference stage, the compress pick when it is at most that below its input model.

    python benchmarks/bench_compress.py --compress runs/compress \\
        --studies runs/studies/* --nncf runs/nncf-int8 [--runs RUN ...] [--rounds 3]

``--nncf`` names the run folder of ``netshrink quantize --weights DENSE --runtime openvino
--out runs/nncf-int8`` (its final stage is the IR).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from netshrink.bench.environment import environment
from netshrink.bench.measure import measure
from netshrink.bench.options import MeasureOptions
from netshrink.report.load import load_run
from netshrink.runtime.files import open_model_file
from netshrink.study.report import read_study_record
from netshrink.study.results import ResultsStore

RESULTS = Path(__file__).parent / "results"
NNCF_LABEL = "dense NNCF INT8 (OpenVINO)"


@dataclass
class Entry:
    label: str
    file: Path
    top1: float | None
    ref_top1: float | None
    size: int = 0
    p50: list[float] = field(default_factory=list)
    thr: list[float] = field(default_factory=list)
    noisy: int = 0  # rounds whose latency or throughput timing was marked noisy

    @property
    def drop_points(self) -> float | None:
        if self.top1 is None or self.ref_top1 is None:
            return None
        return (self.ref_top1 - self.top1) * 100


def study_entries(folder: Path) -> list[Entry]:
    """Each cell's final file with its test top-1 and its study's reference top-1."""
    study = read_study_record(folder)
    db = Path(study.get("db") or folder / "results.sqlite")
    reference = (study.get("report") or {}).get("baseline")
    with ResultsStore(db, create=False) as store:
        rows = store.rows(study["name"])
    entries = []
    for cell in study["cells"]:
        mine = [r for r in rows if r["cell"] == cell["name"]]
        if not mine:
            continue
        ref = next((r for r in mine if r["stage"] == reference), None) or next(
            (r for r in mine if r["top1"] is not None), None)
        last = mine[-1]
        entries.append(Entry(f"{study['name']}/{cell['name']}",
                             smallest_file(folder / "cells" / cell["name"] / last["artifact"],
                                           json.loads(last["record"])["measurement"]),
                             last["top1"], ref["top1"] if ref else None))
    return entries


def smallest_file(artifact: Path, measurement: dict) -> Path:
    """The stage's smallest file that loads and runs: an INT8 stage's packed ``.nspk``
    (sparse int8 weights, zstd; it runs in the same runtime) where it wrote one."""
    packed = artifact.with_suffix(".nspk")
    if (measurement.get("sizes") or {}).get("packed") and packed.is_file():
        return packed
    return artifact


def run_entry(folder: Path, label: str) -> Entry:
    """The final stage of a run folder against its first evaluated stage."""
    record = load_run(folder)
    last = record.stages[-1]
    first = next(s for s in record.stages if s.measurement and s.measurement.accuracy)
    assert last.measurement is not None and last.artifact is not None
    acc = last.measurement.accuracy
    file = smallest_file(folder / last.artifact, last.measurement.model_dump(mode="json"))
    return Entry(label, file, acc.top1 if acc else None,
                 first.measurement.accuracy.top1)  # type: ignore[union-attr]


def time_round(entries: list[Entry], threads: int, batch: int) -> None:
    options = MeasureOptions(threads=threads, batch_size=batch, memory=False)
    for e in entries:
        opened = open_model_file(e.file, threads=threads)
        try:
            m = measure(opened.module, input_shape=opened.input_shape or [1, 28, 28],
                        options=options)
        finally:
            opened.close()
        e.size = opened.size_bytes
        assert m.latency is not None and m.throughput is not None
        e.p50.append(m.latency.p50_ms)
        e.thr.append(m.throughput.images_per_s)
        e.noisy += int(m.noisy)
        print(f"  {e.label}: p50 {m.latency.p50_ms:.3f} ms, {m.throughput.images_per_s:,.0f} "
              "img/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compress", type=Path, required=True)
    parser.add_argument("--studies", type=Path, nargs="*", default=[])
    parser.add_argument("--nncf", type=Path, help="run folder of the dense NNCF INT8 IR")
    parser.add_argument("--runs", type=Path, nargs="*", default=[],
                        help="more run folders whose final file is timed alongside (the "
                             "pick's structure in another runtime, say), labelled by name")
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--name", default="compress_vs_cells")
    args = parser.parse_args(argv)

    chosen = run_entry(args.compress / "chosen", "compress (chosen)")
    entries = [chosen]
    if args.nncf:
        entries.append(run_entry(args.nncf, NNCF_LABEL))
    entries += [run_entry(folder, folder.name) for folder in args.runs]
    cells = [e for folder in args.studies for e in study_entries(folder)]
    within = [e for e in cells if e.drop_points is not None and e.drop_points <= args.budget]
    print(f"{len(cells)} study cells, {len(within)} within {args.budget:g} points")
    entries += within
    torch.set_num_threads(args.threads)
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds}", flush=True)
        time_round(entries, args.threads, args.batch)

    env = environment(threads=args.threads, seed=0)
    p50 = {e.label: statistics.median(e.p50) for e in entries}
    thr = {e.label: statistics.median(e.thr) for e in entries}
    lines = [f"# {args.name}", "",
             f"Measured on {env.cpu}, {args.threads} threads, torch "
             f"{env.versions.get('torch')}, one process, {args.rounds} rounds round-robin "
             "(median of the rounds' medians). Top-1 on the test split from each run's "
             "records; drop against each file's own reference.", "",
             "| file | top-1 % | drop (points) | size B | compress smaller | b1 p50 ms | "
             "compress faster b1 | b32 img/s | compress faster b32 | noisy rounds |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        lines.append(
            f"| {e.label} | {e.top1 * 100:.2f} | {e.drop_points:+.2f} | {e.size:,} | "
            f"{e.size / chosen.size:.2f}x | {p50[e.label]:.3f} | "
            f"{p50[e.label] / p50[chosen.label]:.2f}x | {thr[e.label]:,.0f} | "
            f"{thr[chosen.label] / thr[e.label]:.2f}x | {e.noisy} of {args.rounds} |")
    beaten = [e for e in entries[1:] if e.size > chosen.size
              and p50[e.label] > p50[chosen.label]]
    lines += ["", f"The compress pick is smaller on disk and faster at batch 1 than "
              f"{len(beaten)} of the {len(entries) - 1} other files."]
    nncf = next((e for e in entries if e.label == NNCF_LABEL), None)
    if nncf is not None:
        lines.append(
            f"Against the dense model's NNCF INT8 in OpenVINO: "
            f"{nncf.size / chosen.size:.2f}x smaller, "
            f"{p50[nncf.label] / p50[chosen.label]:.2f}x faster at batch 1 and "
            f"{thr[chosen.label] / thr[nncf.label]:.2f}x at batch {args.batch} "
            f"(top-1 {chosen.top1 * 100:.2f}% against {nncf.top1 * 100:.2f}%).")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"entries": [{"label": e.label, "file": str(e.file), "top1": e.top1,
                      "ref_top1": e.ref_top1, "size": e.size, "p50_ms": e.p50,
                      "images_per_s": e.thr} for e in entries],
         "environment": env.model_dump(mode="json")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
