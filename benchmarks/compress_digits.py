"""The digits case of issue 25: ``compress --budget-points 1`` as a new user runs it on a
small dataset, and what its pick does on the test split.

1. ``netshrink train --data digits --epochs E --out WORK/train``: scikit-learn's 8x8
   digits at the command's defaults (ResNet-18, ImageNet stem, SGD). Of the 1,797 images
   the dataset holds out a fixed, stratified 20% (360) as test; the run holds out
   ``min(5000, n // 10)`` of the other 1,437 as validation (the default ``data.val_size``):
   **143 images**, one image = 0.70 points.
2. ``netshrink compress --weights WORK/train/.../model.safetensors --budget-points 1
   --out WORK/compress`` plus ``--compress-args`` (default ``--no-timing``: the size
   target needs no timing, and timing every stage is most of the search's time on 2
   shared cores). compress decides on the input model's own 143 validation images.
3. Every candidate's deployable file and the input model evaluated on the 360 test images
   in this process, and each candidate's change against the input model on both splits
   with ``netshrink.compress.guard.drop_bound`` (paired on the per-image hits, one-sided
   90%): what the search decided on, and what it would have seen with the test split.
4. ``split_warning(143, 1)``: what the guard says of this split.

The model cache is ``WORK/cache`` (``--cache``), so a first run trains everything and its
times are from scratch; a rerun over the same ``WORK`` resumes (train and compress reuse
what they finished). Writes ``--markdown`` (default ``benchmarks/results/compress_digits.md``)
and a JSON beside it.

    python benchmarks/compress_digits.py --work runs/compress-digits [--epochs 30]
        [--compress-args '--no-timing']
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DEFAULT_COMPRESS_ARGS = "--no-timing"


def run_cli(argv: list[str], log_path: Path, cache: Path) -> tuple[int, float, float]:
    """Run ``python -m netshrink ARGV`` (this checkout's source) with the model cache in
    ``cache``, its output into ``log_path``; returns the exit code, wall seconds and CPU
    seconds (user + system: on a machine shared with others the wall time says more
    about them, the CPU time what the command itself needs)."""
    env = dict(os.environ, NETSHRINK_CACHE=str(cache))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run([sys.executable, "-m", "netshrink", *argv], env=env,
                              stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.returncode, wall, cpu


def _log_lines(path: Path, *needles: str) -> list[str]:
    return [line.rstrip() for line in path.read_text().splitlines()
            if any(n in line for n in needles) and not line.startswith("  ")]


def candidates(out: Path) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """The search's name, its record, and per candidate its final row."""
    from netshrink.study.report import read_study_record
    from netshrink.study.results import ResultsStore

    record = read_study_record(out)
    with ResultsStore(out / "results.sqlite", readonly=True) as store:
        rows = store.rows(record["name"])
    last: dict[str, dict[str, Any]] = {}
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["cell"] not in last or row["stage_index"] > last[row["cell"]]["stage_index"]:
            last[row["cell"]] = row
        if row["stage_index"] == 0:
            first[row["cell"]] = row
    order = [c["name"] for c in record["cells"] if c["name"] in last]
    return record["name"], record, [{"cell": c, "deploy": last[c], "baseline": first[c]}
                                    for c in order]


def _accuracy(row: dict[str, Any]):
    from netshrink.stages.record import StageRecord

    m = StageRecord.model_validate_json(row["record"]).measurement
    return m.accuracy if m is not None else None


def evaluate_on_test(files: dict[str, Path]) -> dict[str, Any]:
    """Each file's ``Accuracy`` on the digits test split (360 images), in this process."""
    from netshrink.bench import evaluate
    from netshrink.data import DataConfig, build_data
    from netshrink.runtime.files import open_model_file

    data = build_data(DataConfig(name="digits", val_size=0))
    result = {}
    for name, path in files.items():
        opened = open_model_file(path, threads=2)
        try:
            result[name] = evaluate(opened.module, data.test, split_name="test")
        finally:
            opened.close()
    return result


def _points(est) -> str:
    return f"{round(-est.drop_points, 2) + 0.0:+.2f} (drop ≤ {est.upper_points:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "compress-digits")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--compress-args", default=DEFAULT_COMPRESS_ARGS,
                        help="more flags for compress (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "compress_digits.md")
    parser.add_argument("--cache", type=Path, default=None,
                        help="the model cache (default: WORK/cache, so that a first run "
                             "trains everything: its times are from scratch)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from netshrink.bench.environment import environment
    from netshrink.compress.guard import (
        DEFAULT_CONFIDENCE,
        compress_headline,
        drop_bound,
        split_warning,
    )

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_argv = ["train", "--data", "digits", "--epochs", str(args.epochs),
                  "--out", str(work / "train")]
    cache = (args.cache or work / "cache").resolve()
    fresh = not cache.exists()  # else a rerun: what was finished before is reused
    rc, train_s, train_cpu = run_cli(train_argv, work / "train.log", cache)
    print(f"train: exit {rc}, {train_s / 60:.1f} min ({train_cpu / 60:.1f} min CPU)",
          flush=True)
    if rc:
        print((work / "train.log").read_text()[-2000:])
        return rc
    weights = work / "train" / "stages" / "01-train" / "model.safetensors"
    compress_argv = ["compress", "--weights", str(weights), "--budget-points",
                     f"{args.budget:g}", "--out", str(work / "compress"),
                     *shlex.split(args.compress_args)]
    rc, compress_s, compress_cpu = run_cli(compress_argv, work / "compress.log", cache)
    print(f"compress: exit {rc}, {compress_s / 60:.1f} min ({compress_cpu / 60:.1f} min CPU)",
          flush=True)
    out = work / "compress"
    if not (out / "study.json").is_file():
        print((work / "compress.log").read_text()[-2000:])
        return rc or 1
    _, record, cands = candidates(out)
    chosen = record.get("chosen")
    files = {"input": weights}
    for c in cands:
        if c["deploy"]["artifact"]:
            files[c["cell"]] = out / "cells" / c["cell"] / c["deploy"]["artifact"]
    test = evaluate_on_test(files)
    ref_val = _accuracy(cands[0]["baseline"])
    images = ref_val.images
    spend = max(0.0, args.budget - 0.25)  # the old search's rule: budget less its reserve
    table = []
    for c in cands:
        val = _accuracy(c["deploy"])
        on_val = drop_bound(ref_val, val)
        on_test = drop_bound(test["input"], test[c["cell"]]) if c["cell"] in test else None
        table.append({
            "candidate": c["cell"] + (" (chosen)" if c["cell"] == chosen else ""),
            "size_bytes": c["deploy"]["size_bytes"],
            "val_top1": val.top1, "val": on_val, "old_rule_within": on_val.drop_points <= spend,
            "guard_within_val": on_val.within(args.budget),
            "test_top1": test[c["cell"]].top1 if on_test else None, "test": on_test,
            "within_on_test": on_test.drop_points <= args.budget if on_test else None,
        })
    warning = split_warning(images, args.budget, DEFAULT_CONFIDENCE)
    by_name = {c["cell"]: c for c in cands}
    headline = compress_headline(
        chosen=chosen, budget_points=args.budget, ref_test=test["input"],
        chosen_test=test.get(chosen) if chosen else None, ref_val=ref_val,
        chosen_val=_accuracy(by_name[chosen]["deploy"]) if chosen in by_name else None,
        ref_size_bytes=weights.stat().st_size,
        chosen_size_bytes=by_name[chosen]["deploy"]["size_bytes"] if chosen in by_name
        else None)
    tail = _log_lines(work / "compress.log", "compress:", "netshrink: error")
    env = environment(device="cpu", threads=2, seed=0)
    times = {"fresh_cache": fresh, "train_minutes": train_s / 60,
             "train_cpu_minutes": train_cpu / 60,
             "compress_minutes": compress_s / 60, "compress_cpu_minutes": compress_cpu / 60}
    write_markdown(args, work, train_argv, compress_argv, times, rc, images,
                   test, table, chosen, warning, headline, tail, env)
    summary = {"validation_images": images, "test_images": test["input"].images,
               "input_test_top1": test["input"].top1, "input_val_top1": ref_val.top1,
               "chosen": chosen, "compress_exit": rc, **times,
               "warning": warning, "headline": headline,
               "candidates": [{**{k: v for k, v in row.items() if k not in ("val", "test")},
                               "val_change": -row["val"].drop_points,
                               "val_upper_drop": row["val"].upper_points,
                               "test_change": -row["test"].drop_points if row["test"] else None,
                               "test_upper_drop": row["test"].upper_points if row["test"]
                               else None} for row in table]}
    args.markdown.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.markdown}")
    return 0


def write_markdown(args, work: Path, train_argv: list[str], compress_argv: list[str],
                   times: dict[str, Any], rc: int, images: int,
                   test: dict[str, Any], table: list[dict[str, Any]], chosen: str | None,
                   warning: str | None, headline: str, tail: list[str], env) -> None:
    def cmd(argv: list[str]) -> str:
        return "netshrink " + " ".join(shlex.quote(a.replace(str(work), "WORK"))
                                       for a in argv)

    pick = next((r for r in table if r["candidate"].endswith("(chosen)")), None)
    lines = [
        f"# compress on digits: a {args.budget:g}-point budget decided on {images} "
        "validation images",
        "",
        f"Written by `benchmarks/compress_digits.py --epochs {args.epochs} --compress-args "
        f"'{args.compress_args}'`, on {env.cpu}, torch {env.versions.get('torch', '?')}, "
        + ("with an empty model cache" if times["fresh_cache"] else
           "over an earlier run's folder and cache (its finished work reused)")
        + f": train {times['train_minutes']:.1f} min of wall time "
        f"({times['train_cpu_minutes']:.1f} min of CPU), compress "
        f"{times['compress_minutes']:.1f} min ({times['compress_cpu_minutes']:.1f} min of "
        f"CPU; exit {rc}). The wall time also depends on what else ran on the 2 cores; "
        "the CPU time is what the commands needed.",
        "",
        "```",
        cmd(train_argv),
        cmd(compress_argv),
        "```",
        "",
        f"- Validation split that decided: **{images} images** (one image = "
        f"{100 / images:.2f} points); test split: {test['input'].images} images.",
        f"- Input model: {test['input'].top1:.2%} top-1 on test.",
    ]
    if pick is not None:
        lines.append(
            f"- The search chose **{chosen}**: validation {_points(pick['val'])} points, "
            f"test {pick['test_top1']:.2%}, **{_points(pick['test'])} points on test**, "
            f"{'within' if pick['within_on_test'] else 'NOT within'} the "
            f"{args.budget:g}-point budget there.")
    else:
        lines.append("- The search chose nothing.")
    lines += [
        "",
        "Every candidate, against the input model; changes in points, the drop's one-sided "
        "90% upper bound from `drop_bound` (paired on the per-image hits) in brackets. "
        f"\"old rule\": what the search counted as within the budget (the validation "
        f"change no worse than -{max(0.0, args.budget - 0.25):g}, the budget less its "
        "0.25 reserve); \"guard\": the upper bound on validation within the budget.",
        "",
        "| candidate | size B | val top-1 | val change | old rule | guard | test top-1 | "
        "test change | within on test |",
        "|:---|---:|---:|---:|:---|:---|---:|---:|:---|",
    ]
    for r in table:
        lines.append(
            f"| {r['candidate']} | {r['size_bytes'] or 0:,} | {r['val_top1']:.2%} | "
            f"{_points(r['val'])} | {'within' if r['old_rule_within'] else 'over'} | "
            f"{'within' if r['guard_within_val'] else 'over'} | "
            + (f"{r['test_top1']:.2%} | {_points(r['test'])} | "
               f"{'yes' if r['within_on_test'] else 'no'} |" if r["test"] else "| | |"))
    discord = [r["val"].discordant for r in table if r["val"].discordant is not None]
    if discord:
        share = sorted(d / images for d in discord)
        lines += ["", f"Disagreement with the input model on the {images} validation images: "
                  f"{share[0]:.1%} to {share[-1]:.1%} of them (median "
                  f"{share[len(share) // 2]:.1%}) across the candidates."]
    guarded = [r for r in table if r["guard_within_val"]]
    if guarded:
        best = min(guarded, key=lambda r: r["size_bytes"] or 0)
        lines += ["", f"Of these candidates, {len(guarded)} of {len(table)} "
                  + ("is" if len(guarded) == 1 else "are") + " within the "
                  "budget by the guard's rule (the validation drop's upper bound within it); "
                  f"the smallest of them, {best['candidate']}, is "
                  + (f"{_points(best['test'])} points on test." if best["test"] else
                     "not measured on test.")]
    else:
        lines += ["", "None of these candidates is within the budget by the guard's rule "
                  "(the validation drop's upper bound within it)."]
    lines += ["", f"What the guard says of this split (`split_warning({images}, "
              f"{args.budget:g}, 0.9)`):", "", f"> {warning or 'no warning'}", "",
              "The headline `compress_headline` gives the old search's pick (the first line "
              "its report will have once the search passes it):", "", f"> {headline}", "",
              "The search's own lines:", "", "```",
              *tail, "```", ""]
    args.markdown.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
