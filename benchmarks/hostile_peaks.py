"""Peak memory and time of the worst hostile input of each class (issue 23), after the walls.

Each case is one of the test suite's hostile tables (``tests/test_hostile_*.py``), built
here as the test builds it and then run as its own ``netshrink`` process under
``/usr/bin/time -v``: what a user would see, exit code and first error line included.
Cases of the Python API run the same way, in a child process of this script.

    python benchmarks/hostile_peaks.py [--name hostile_peaks]

prints a Markdown table and writes it to ``benchmarks/results/<name>.md``. About 270 MB
and 3-5 s of every row are the CLI's own start (torch, onnx and the rest imported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# (class, table, case): the worst case of each class the issue names
SELECTED = [
    ("planted link: resume removes the user's folder", "walls",
     "resume-stages-linked-with-a-listed-folder"),
    ("planted link: report writes the user's files", "walls", "report-report-files-linked"),
    ("planted link: study cells", "study", "run-resume-cells-linked"),
    ("foreign database: recursive view", "study", "show-recursive-view-as-rows"),
    ("foreign database: the user's own", "study", "show-user-db-named-by-study-json"),
    ("image shape: 2,986-byte 3,000,000x1 PNG", "data", "predict-png-3000000x1-2986-bytes"),
    ("image shape: 224-px RGB model", "data", "predict-png-3000000x1-rgb224-model"),
    ("image shape: in an image folder's val/", "data", "run-folder-strip-in-val"),
    ("data.image_size", "data", "recipe-image-size-2048-default-batch"),
    ("model file within bounds: image_size 4096", "models",
     "safetensors-image-size-4096-eval"),
    ("model file within bounds: pruned widths", "models",
     "safetensors-pruned-20000-wide-bench"),
    ("foreign ONNX input shape", "models", "onnx-input-60000px-eval"),
    ("foreign IR input shape", "models", "ir-input-40000px-bench"),
    ("study file: 1,000 cells", "study", "run-study-expands-past-the-bound"),
    ("IDX: 2 MB gzip declaring 2 GB", "data", "idx-gz-declares-2-gb"),
    ("CIFAR: pickle of 600k lists", "data", "cifar-pickle-600k-empty-lists"),
    ("trusted factory's kwargs from the file", "models",
     "api-load-custom-kwargs-width-20000"),
    ("output beside output: an IR's .bin", "walls", "export-ir-bin-of-someone-else"),
    ("recipe of 20,000 stages", "bounds", "recipe-20000-stages"),
]
# the models table runs with these (tests/test_hostile_models.py)
MODEL_ENV = {"NETSHRINK_MAX_ACTIVATION_BYTES": "", "NETSHRINK_MAX_IMAGE_SIZE": "4096"}


@contextlib.contextmanager
def patched() -> Iterator[Any]:
    """A ``pytest.MonkeyPatch`` for builders that set variables or the folder."""
    import pytest

    with pytest.MonkeyPatch.context() as patch:
        yield patch


class Fixtures:
    """What the tables' builders take: a learnable Fashion-MNIST, a finished tiny run and
    a finished tiny study, made once."""

    def __init__(self, root: Path) -> None:
        from conftest import write_learnable_fashion
        from netshrink.cli import main
        from netshrink.study import parse_study, run_study
        from test_hostile_runs import TINY
        from test_hostile_study import study_dict

        self.root = root
        self.fashion = write_learnable_fashion(root / "fashion")
        raw = json.loads(json.dumps(TINY))
        raw["data"]["root"] = str(self.fashion)
        recipe = root / "tiny.yaml"
        recipe.write_text(json.dumps(raw))
        self.run = root / "run"
        assert main(["run", str(recipe), "--out", str(self.run), "--no-report"]) == 0
        self.study = root / "study"
        run_study(parse_study(study_dict(self.fashion)), self.study, log=lambda _: None)

    def build(self, table: str, case: str, tmp: Path, patch: Any
              ) -> list[str] | Callable[[], object]:
        """The argv (or API call) of ``case`` in ``table``, its files made in ``tmp``."""
        tmp.mkdir(parents=True)
        patch.chdir(tmp)
        if table in ("walls", "bounds"):
            import test_hostile_bounds
            import test_hostile_runs
            import test_hostile_walls

            module = test_hostile_walls if table == "walls" else test_hostile_bounds
            env = test_hostile_runs.Env(tmp / "case", self.fashion, self.run)
            env.tmp.mkdir()
            return module.CASES[case](env)
        if table == "data":
            import test_hostile_data

            env = test_hostile_data.Env(tmp / "case", self.fashion, patch)
            env.tmp.mkdir()
            return test_hostile_data.CASES[case][0](env)
        if table == "study":
            import test_hostile_study

            env = test_hostile_study.Env(tmp / "case", self.fashion, self.study, patch)
            env.tmp.mkdir()
            return test_hostile_study.CASES[case](env)
        import test_hostile_models

        for name, value in MODEL_ENV.items():
            patch.setenv(name, value)
        found = {p.id: p.values[0] for p in test_hostile_models.CASES}
        return found[case](tmp)


def _time_v(command: list[str], env: dict[str, str], cwd: str) -> dict[str, Any]:
    """Run ``command`` under ``/usr/bin/time -v``: exit code, peak RSS, wall, stderr."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        t0 = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-v", "-o", report.name, *command],
                              capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
        wall = time.perf_counter() - t0
        text = Path(report.name).read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"code": done.returncode, "peak_mb": int(rss.group(1)) / 1024 if rss else None,
            "wall_s": wall, "lines": len(lines), "first": lines[0] if lines else "",
            "traceback": "Traceback" in done.stderr}


def measure(fixtures: Fixtures, table: str, case: str, work: Path) -> dict[str, Any]:
    """Build ``case`` and run it as its own process (an API case: this script, in
    ``--api`` mode, rebuilds and calls it)."""
    with patched() as patch:
        built = fixtures.build(table, case, work / case, patch)
        env = dict(os.environ)
        cwd = os.getcwd()
    if callable(built):
        command = [sys.executable, __file__, "--api", table, case, str(work / f"{case}-api")]
    else:
        command = [sys.executable, "-m", "netshrink", *built]
    return _time_v(command, env, cwd)


def run_api_case(table: str, case: str, folder: Path) -> int:
    """Child mode: rebuild an API case and call it; one error line, as the CLI would."""
    from netshrink.errors import UserError

    with patched() as patch:
        fixtures = Fixtures.__new__(Fixtures)  # the models table needs none of them
        call = fixtures.build(table, case, folder, patch)
        assert callable(call)
        try:
            call()
        except UserError as exc:
            print(f"netshrink: error: {exc}", file=sys.stderr)
            return 2
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="hostile_peaks")
    parser.add_argument("--api", nargs=3, metavar=("TABLE", "CASE", "DIR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.api:
        return run_api_case(args.api[0], args.api[1], Path(args.api[2]))
    flags = sorted(set(re.findall(r"\b(avx2|avx512\w*|amx\w*)\b",
                                  Path("/proc/cpuinfo").read_text())))
    rows = ["| class | case | exit | lines | peak RSS MB | wall s | first line |",
            "|:---|:---|---:|---:|---:|---:|:---|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["NETSHRINK_CACHE"] = str(root / "cache")
        fixtures = Fixtures(root / "fixtures")
        for what, table, case in SELECTED:
            r = measure(fixtures, table, case, root / "work")
            first = r["first"].replace(str(root), "TMP").replace("|", "/")
            if len(first) > 160:
                first = first[:157] + "..."
            rows.append(f"| {what} | {table}: `{case}` | {r['code']} | {r['lines']} "
                        f"| {r['peak_mb']:,.0f} | {r['wall_s']:.1f} | {first} |")
            print(rows[-1], flush=True)
    head = [f"# Hostile inputs: peak memory and time ({time.strftime('%Y-%m-%d')})", "",
            f"`python benchmarks/hostile_peaks.py`; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, CPU flags {' '.join(flags) or 'none of avx2/avx512/amx'}; "
            "each case its own process under `/usr/bin/time -v` (about 270 MB and 3-5 s of "
            "each row are the CLI's start).", ""]
    out = ROOT / "benchmarks" / "results" / f"{args.name}.md"
    out.write_text("\n".join(head + rows) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
