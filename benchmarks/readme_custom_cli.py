"""The README's custom-model example, saved once, then every command on that file.

Runs the README's Python API example as written (its ``smallcnn.py`` and the example, on
the full Fashion-MNIST, ``EPOCHS`` as the README has it), which saves ``small.safetensors``
with its factory ``smallcnn:make_cnn``; then ``eval``, ``predict``, ``bench``, ``export``,
``prune``, ``quantize`` and ``compress`` on that file from the command line, each trusting
the factory with ``--trust``, and writes each command's exit code, time and last lines to
``benchmarks/results/readme_custom_cli.md``.

    python benchmarks/readme_custom_cli.py --work runs/readme-custom [--compress-args ...]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from netshrink.bench.environment import environment
from netshrink.data.idx import read_fashion_mnist

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FASHION = Path("/usr/share/datasets/fashion-mnist")
TRUST = ["--trust", "smallcnn:make_cnn"]


def readme_blocks() -> tuple[str, str]:
    """The README's Python API blocks: ``smallcnn.py`` and the example."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_readme_python import python_blocks

    module, example = python_blocks()
    return module, example


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - started, (done.stdout + done.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for every file")
    parser.add_argument("--compress-args", default="",
                        help="extra flags for the compress command (default: none)")
    parser.add_argument("--tail", type=int, default=8, help="last lines kept per command")
    parser.add_argument("--epochs", type=int,
                        help="the example's EPOCHS (default: the README's own)")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    module, example = readme_blocks()
    (work / "smallcnn.py").write_text(module)
    if args.epochs is not None:
        assert "EPOCHS = 3" in example, "the README's example no longer sets EPOCHS = 3"
        example = example.replace("EPOCHS = 3", f"EPOCHS = {args.epochs}")
    (work / "example.py").write_text(example)
    env = {**os.environ, "PYTHONPATH": str(work), "OMP_NUM_THREADS": "2"}
    raw = read_fashion_mnist(FASHION)
    Image.fromarray(raw.test_images[0, 0].numpy().astype(np.uint8)).save(work / "test0.png")
    netshrink = [sys.executable, "-m", "netshrink"]
    steps: list[tuple[str, list[str]]] = [
        ("python example.py (the README's)", [sys.executable, "example.py"]),
        ("eval", [*netshrink, "eval", "--weights", "small.safetensors", *TRUST]),
        ("predict", [*netshrink, "predict", "--weights", "small.safetensors", "test0.png",
                     *TRUST]),
        ("bench", [*netshrink, "bench", "--weights", "small.safetensors", "--repeats", "3",
                   *TRUST]),
        ("export", [*netshrink, "export", "--weights", "small.safetensors", "--format",
                    "onnx", "--out", "small.onnx", *TRUST]),
        ("prune", [*netshrink, "prune", "--weights", "small.safetensors", "--method",
                   "channel", "--ratio", "0.3", "--finetune-epochs", "1", "--out", "prune",
                   *TRUST]),
        ("quantize", [*netshrink, "quantize", "--weights", "small.safetensors", "--method",
                      "ptq", "--out", "quantize", *TRUST]),
        ("compress", [*netshrink, "compress", "--weights", "small.safetensors",
                      "--budget-points", "1", "--out", "compress", *TRUST,
                      *shlex.split(args.compress_args)]),
    ]
    env_facts = environment(threads=2, seed=0)
    given = sys.argv[1:] if argv is None else argv
    lines = ["# readme_custom_cli", "",
             f"The README's custom-model example saved once (`small.safetensors`, factory "
             f"`smallcnn:make_cnn`), then each command on that file. {env_facts.cpu}, "
             f"torch {env_facts.versions.get('torch')}. Reproduce: "
             f"`python benchmarks/{Path(__file__).name} {shlex.join(given)}`.", ""]
    failed = 0
    for label, command in steps:
        print(f"== {label}: {shlex.join(command)}", flush=True)
        code, seconds, output = run(command, work, env)
        failed += code != 0
        tail = "\n".join(output.rstrip().splitlines()[-args.tail:])
        print(tail, flush=True)
        shown = shlex.join(["netshrink", *command[3:]]) if command[:3] == netshrink \
            else label
        lines += [f"## {label}", "", f"`{shown}`: exit {code}, {seconds:.1f} s", "",
                  "```", tail, "```", ""]
        if label.startswith("python") and code != 0:
            break
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "readme_custom_cli.md").write_text("\n".join(lines))
    print(f"{len(steps) - failed} of {len(steps)} steps exited 0")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
