"""Constraint-first ``compress`` against uniform channel pruning to the same latency, with
the same fine-tuning budget (issue 25).

For each latency bound B (ms, batch 1):

1. ``netshrink compress --weights STUDENT --max-latency-ms B`` with no other flag (blocks
   removed x channel ratios, the same in every layer; runtime chosen by measurement);
2. the same command restricted to uniform channel pruning: ``--drop-blocks 0
   --channel-ratios 0.2,0.3,...,0.8`` (no depth pruning, every layer cut alike), so the
   same machinery (structures timed whole before training, the same rungs of
   fine-tuning, the most accurate that meets the bound) picks the uniform ratio that
   meets B;
3. both picks of every bound opened where they run and timed round-robin in this
   process, ``--rounds`` rounds (``bench_compress.time_round``): each pick's measured
   batch-1 p50 against B, and its test top-1 (the search's own test measurement) against
   the uniform pick's.

Each step is skipped when its folder already holds its result, so the script resumes.

    python benchmarks/compress_constraints.py --student STUDENT --work runs/constraints \\
        --bounds 0.25,0.15,0.1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from netshrink.bench.environment import environment

sys.path.insert(0, str(Path(__file__).parent))
from bench_compress import Entry, run_entry, time_round

RESULTS = Path(__file__).parent / "results"
NETSHRINK = [sys.executable, "-m", "netshrink"]
UNIFORM = ["--drop-blocks", "0", "--channel-ratios", "0.2,0.3,0.4,0.5,0.6,0.7,0.8"]


def _search(student: Path, bound: float, out: Path, extra: list[str]) -> dict:
    """Run one constrained compress into ``out`` (unless done); its wall time and
    command."""
    facts = out.with_name(out.name + ".json")
    if not (out / "chosen").exists():
        cmd = [*NETSHRINK, "compress", "--weights", str(student), "--max-latency-ms",
               f"{bound:g}", "--out", str(out), *extra]
        t0 = time.perf_counter()
        with out.with_name(out.name + ".log").open("w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        if proc.returncode and not (out / "results.sqlite").exists():
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see its log")
        # exit 1 with a results store: it ran, and nothing met the bound (a result)
        facts.write_text(json.dumps({"wall_s": time.perf_counter() - t0, "command": cmd,
                                     "chosen": (out / "chosen").exists()}))
    return json.loads(facts.read_text())


def _candidates(out: Path) -> int:
    """Candidates the search ran (not the structures it built untrained to time)."""
    cells = out / "cells"
    return sum(1 for c in cells.iterdir() if "-r-1-" not in c.name) if cells.is_dir() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--bounds", required=True, help="latency bounds in ms, e.g. 0.25,0.15")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--name", default="compress_constraints")
    args = parser.parse_args(argv)
    bounds = [float(b) for b in args.bounds.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    pairs: list[tuple[float, Entry | None, Entry | None, dict, dict]] = []

    def entry(folder: Path, label: str) -> Entry | None:
        return run_entry(folder / "chosen", label) if (folder / "chosen").exists() else None

    for bound in bounds:
        picked = _search(args.student, bound, args.work / f"c{bound:g}", [])
        uniform = _search(args.student, bound, args.work / f"u{bound:g}", UNIFORM)
        pairs.append((bound, entry(args.work / f"c{bound:g}", f"compress {bound:g} ms"),
                      entry(args.work / f"u{bound:g}", f"uniform {bound:g} ms"),
                      picked, uniform))
    entries = [e for _, a, b, _, _ in pairs for e in (a, b) if e is not None]
    torch.set_num_threads(args.threads)
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds}", flush=True)
        time_round(entries, args.threads, args.batch)
    env = environment(threads=args.threads, seed=0)
    lines = [f"# {args.name}", "",
             f"Measured on {env.cpu}, {args.threads} threads, one process, {args.rounds} "
             "rounds round-robin (median of the rounds' batch-1 p50). Top-1 on the test "
             "split, from each search's own measurement of its pick.", "",
             "| bound ms | search | pick | test top-1 | change (points) | b1 p50 ms | meets | "
             "candidates | wall min |",
             "|---:|:---|:---|---:|---:|---:|:---|---:|---:|"]
    verdicts = []
    for bound, pick, uni, pf, uf in pairs:
        for label, e, facts, folder in (("compress (default)", pick, pf, f"c{bound:g}"),
                                        ("uniform channels", uni, uf, f"u{bound:g}")):
            if e is None:
                lines.append(f"| {bound:g} | {label} | none meets the bound | | | | NO | "
                             f"{_candidates(args.work / folder)} | "
                             f"{facts['wall_s'] / 60:.1f} |")
                continue
            p50 = statistics.median(e.p50)
            drop = e.drop_points or 0.0
            lines.append(
                f"| {bound:g} | {label} | {e.file.parent.name}/{e.file.name} | "
                f"{(e.top1 or 0) * 100:.2f}% | {-drop:+.2f} | {p50:.3f} | "
                f"{'yes' if p50 <= bound else 'NO'} | {_candidates(args.work / folder)} | "
                f"{facts['wall_s'] / 60:.1f} |")
        if pick is None or uni is None:
            verdicts.append(f"{bound:g} ms: " + ("no pick meets the bound" if pick is None
                                                 else "uniform channel pruning meets it with "
                                                 "none; the pick does"))
            continue
        held = (pick.top1 or 0) >= (uni.top1 or 0)
        verdicts.append(f"{bound:g} ms: the pick {'is' if held else 'is NOT'} "
                        f"at least as accurate as uniform channel pruning "
                        f"({(pick.top1 or 0) * 100:.2f}% against {(uni.top1 or 0) * 100:.2f}%)")
    lines += ["", *[f"- {v}" for v in verdicts]]
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"entries": [{"label": e.label, "file": str(e.file), "top1": e.top1,
                      "ref_top1": e.ref_top1, "p50_ms": e.p50} for e in entries],
         "environment": env.model_dump(mode="json")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
