"""The Python API example of the docs (the "Python API" page, docs/python-api.md) runs as
written: a custom CNN and plain DataLoaders, channel-pruned, fine-tuned with the teacher,
quantized to INT8, measured, saved, reloaded with identical outputs. Here on the small
test dataset, with fewer epochs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from doc_pages import section


def python_blocks() -> list[str]:
    """The Python blocks under the "Python API" heading (README.md or a docs page)."""
    _, text = section("Python API")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_python_example_runs(fashion_dir: Path, tmp_path: Path) -> None:
    module, example = python_blocks()
    (tmp_path / "smallcnn.py").write_text(module)
    assert 'FASHION = Path("/usr/share/datasets/fashion-mnist")' in example
    assert "EPOCHS = 3" in example
    example = example.replace('FASHION = Path("/usr/share/datasets/fashion-mnist")',
                              f"FASHION = Path({str(fashion_dir)!r})")
    (tmp_path / "example.py").write_text(example.replace("EPOCHS = 3", "EPOCHS = 1"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    params = re.search(r"params ([\d,]+) -> ([\d,]+)", lines[0])
    assert params and int(params[2].replace(",", "")) < int(params[1].replace(",", ""))
    assert "INT8" in lines[1] and lines[2].startswith("predicted: [")
    assert (tmp_path / "small.safetensors").is_file()
    assert (tmp_path / "small-int8.onnx").is_file()
