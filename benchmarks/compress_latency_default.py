"""The default latency search on the quickstart's student against the dense student's
NNCF INT8 in OpenVINO, timed side by side by netshrink's bench and by OpenVINO's own
``benchmark_app``.

    python benchmarks/compress_latency_default.py \\
        --student runs/quickstart/stages/03-student/model.safetensors --work runs/lat-default

Steps (each skipped when its folder already holds its result, so the script resumes):
1. ``netshrink compress --weights STUDENT --budget-points 1 --target latency --out
   WORK/search`` (no other flag), its wall time recorded;
2. ``netshrink quantize --weights STUDENT --method ptq --runtime openvino --out WORK/nncf``;
3. ``benchmarks/bench_compress.py`` on both (netshrink's timing, round-robin);
4. ``benchmark_app`` on both files, batch 1 and batch 32, one stream, the threads given,
   ``--rounds`` rounds round-robin (median of the rounds' medians / throughputs).
The table goes to ``benchmarks/results/<name>.md`` with the CPU flags named.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from netshrink.bench.environment import environment
from netshrink.report.load import load_run

RESULTS = Path(__file__).parent / "results"
NETSHRINK = [sys.executable, "-m", "netshrink"]


def _run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output to ``log``; its wall time in seconds."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def _final_file(run: Path) -> Path:
    record = load_run(run)
    last = record.stages[-1]
    assert last.artifact, f"{run}: its last stage wrote no file"
    path = run / last.artifact
    # an OpenVINO stage writes a folder: its IR is the model.xml in it
    return path / "model.xml" if path.is_dir() else path


def _chosen(search: Path) -> Path:
    return _final_file(search / "chosen")


def _test_top1(run: Path) -> tuple[float, float]:
    """The last stage's and the first stage's top-1 on the test split of ``run``."""
    record = load_run(run)
    first, last = record.stages[0].measurement, record.stages[-1].measurement
    assert first and last and first.accuracy and last.accuracy
    return last.accuracy.top1, first.accuracy.top1


def _benchmark_app(model: Path, batch: int, threads: int, seconds: int) -> tuple[float, float]:
    """OpenVINO's benchmark_app on ``model``: (median latency ms, throughput img/s)."""
    app = Path(sys.executable).with_name("benchmark_app")
    cmd = [str(app), "-m", str(model), "-d", "CPU", "-hint", "none", "-nstreams", "1",
           "-nthreads", str(threads), "-b", str(batch), "-t", str(seconds),
           "-shape", f"[{batch},1,28,28]"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    found = re.search(r"Median:\s+([\d.]+) (ms|us)", out)
    assert found, f"benchmark_app printed no median latency for {model}"
    median = float(found.group(1)) / (1000 if found.group(2) == "us" else 1)
    fps = float(re.search(r"Throughput:\s+([\d.]+) FPS", out).group(1))  # type: ignore[union-attr]
    return median, fps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=5, help="benchmark_app -t")
    parser.add_argument("--compress-args", default="",
                        help="extra compress flags (the default run gives none)")
    parser.add_argument("--name", default="compress_latency_default")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    search, nncf = args.work / "search", args.work / "nncf"
    facts: dict[str, object] = {}
    wall_file = args.work / "search_wall_s.json"
    if not (search / "chosen").exists():
        cmd = [*NETSHRINK, "compress", "--weights", str(args.student), "--budget-points",
               "1", "--target", "latency", "--out", str(search), *args.compress_args.split()]
        wall = _run(cmd, args.work / "search.log")
        wall_file.write_text(json.dumps({"wall_s": wall, "command": cmd}))
    facts["search"] = json.loads(wall_file.read_text()) if wall_file.exists() else {}
    if not nncf.exists():
        _run([*NETSHRINK, "quantize", "--weights", str(args.student), "--method", "ptq",
              "--runtime", "openvino", "--out", str(nncf)], args.work / "nncf.log")
    _run([sys.executable, str(Path(__file__).with_name("bench_compress.py")), "--compress",
          str(search), "--nncf", str(nncf), "--rounds", str(args.rounds), "--threads",
          str(args.threads), "--name", f"{args.name}_netshrink_bench"],
         args.work / "bench.log")
    files = {"compress pick": _chosen(search), "dense NNCF INT8 (OpenVINO)": _final_file(nncf)}
    timings: dict[str, dict[int, list[tuple[float, float]]]] = {
        k: {1: [], 32: []} for k in files}
    for _ in range(args.rounds):
        for label, path in files.items():
            for batch in (1, 32):
                timings[label][batch].append(
                    _benchmark_app(path, batch, args.threads, args.seconds))
    pick_top1, ref_top1 = _test_top1(search / "chosen")
    nncf_top1, _ = _test_top1(nncf)
    env = environment(threads=args.threads, seed=0)
    lines = [f"# {args.name}", "",
             f"Machine: {env.cpu}; "
             f"{args.threads} threads, one stream; {args.rounds} rounds round-robin of "
             f"benchmark_app -t {args.seconds} (median of the rounds).", "",
             f"Search: `{' '.join(map(str, facts['search'].get('command', [])))}` "  # type: ignore[union-attr]
             f"in {facts['search'].get('wall_s', 0) / 60:.1f} min of wall time.", "",  # type: ignore[union-attr]
             "| file | test top-1 | size B | b1 median ms | b32 img/s |",
             "|:---|---:|---:|---:|---:|"]
    stats = {}
    for label, path in files.items():
        b1 = statistics.median(m for m, _ in timings[label][1])
        b32 = statistics.median(f for _, f in timings[label][32])
        size = path.stat().st_size + (path.with_suffix(".bin").stat().st_size
                                      if path.suffix == ".xml" else 0)
        top1 = pick_top1 if label == "compress pick" else nncf_top1
        stats[label] = (b1, b32)
        lines.append(f"| {label} ({path.name}) | {top1:.2%} | {size:,} | {b1:.3f} | "
                     f"{b32:,.0f} |")
    (p1, p32), (n1, n32) = stats["compress pick"], stats["dense NNCF INT8 (OpenVINO)"]
    lines += ["", f"The pick against the dense NNCF INT8: **{n1 / p1:.2f}x at batch 1, "
              f"{p32 / n32:.2f}x at batch 32** (benchmark_app); test top-1 {pick_top1:.2%} "
              f"against the student's {ref_top1:.2%} ({(pick_top1 - ref_top1) * 100:+.2f} "
              f"points). netshrink's own side-by-side timing: "
              f"`{args.name}_netshrink_bench.md`."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
