"""The default size search on the quickstart's student (issue 25): how much smaller than
the student's FP32 safetensors its pick is, and what it costs on the test split.

    python benchmarks/compress_size_default.py \\
        --student runs/quickstart/stages/03-student/model.safetensors --work runs/size-default

Runs ``netshrink compress --weights STUDENT --budget-points 1 --target size --out
WORK/search`` with no other flag (skipped when ``WORK/search/chosen`` exists, so the
script resumes), records its wall time, and writes ``benchmarks/results/<name>.md``: the
pick, its file's bytes against the student's file, and test top-1 against the student's
(both measured by the search on the test split), with the candidates and fine-tuning
epochs the search spent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from netshrink.bench.environment import environment
from netshrink.report.load import load_run
from netshrink.study.report import read_study_record
from netshrink.study.results import ResultsStore

RESULTS = Path(__file__).parent / "results"
NETSHRINK = [sys.executable, "-m", "netshrink"]


def spent(search: Path) -> tuple[int, float]:
    """Candidates the search ran and the fine-tuning epochs it spent: each distinct
    finetune stage (by its key, the hash of everything upstream) once, since the later
    rungs' candidates find the earlier rungs' stages in the model cache."""
    record = read_study_record(search)
    with ResultsStore(search / "results.sqlite", readonly=True) as store:
        rows = store.rows(record["name"])
    epochs: dict[str, float] = {}
    for row in rows:
        stage = json.loads(row["record"])
        if stage.get("kind") in ("finetune", "quant.kmeans"):
            config = stage.get("config") or {}
            epochs[stage["key"]] = float(config.get("epochs")
                                         or config.get("finetune_epochs") or 0)
    tried = {row["cell"] for row in rows if "-r-1-" not in row["cell"]}  # not structures
    return len(tried), sum(epochs.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--name", default="compress_size_default")
    parser.add_argument("--compress-args", default="",
                        help="extra compress flags (the default run gives none)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    search, facts_file = args.work / "search", args.work / "search_wall_s.json"
    if not (search / "chosen").exists():
        cmd = [*NETSHRINK, "compress", "--weights", str(args.student), "--budget-points", "1",
               "--target", "size", "--out", str(search), *args.compress_args.split()]
        t0 = time.perf_counter()
        with (args.work / "search.log").open("w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        facts_file.write_text(json.dumps({"wall_s": time.perf_counter() - t0, "command": cmd,
                                          "exit": proc.returncode}))
    facts = json.loads(facts_file.read_text())
    chosen = load_run(search / "chosen")
    first, last = chosen.stages[0], chosen.stages[-1]
    assert last.artifact and last.measurement and last.measurement.accuracy
    assert first.measurement and first.measurement.accuracy
    pick = search / "chosen" / last.artifact
    student_bytes = args.student.stat().st_size
    top1, ref = last.measurement.accuracy.top1, first.measurement.accuracy.top1
    candidates, epochs = spent(search)
    env = environment(threads=2, seed=0)
    lines = [f"# {args.name}", "", f"Machine: {env.cpu}.", "",
             f"Search: `{' '.join(map(str, facts['command']))}` in "
             f"{facts['wall_s'] / 60:.1f} min of wall time (exit {facts['exit']}), "
             f"{candidates} candidates, {epochs:g} epochs of fine-tuning run.", "",
             "| file | bytes | smaller than FP32 | test top-1 | change (points) |",
             "|:---|---:|---:|---:|---:|",
             f"| student FP32 ({args.student.name}) | {student_bytes:,} | 1x | {ref:.2%} | |",
             f"| pick ({pick.parent.name}/{pick.name}) | {pick.stat().st_size:,} | "
             f"**{student_bytes / pick.stat().st_size:.1f}x** | {top1:.2%} | "
             f"{(top1 - ref) * 100:+.2f} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / f"{args.name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
