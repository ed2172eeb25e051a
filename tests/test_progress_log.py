"""Progress in a log file: with output to a file (no terminal) a run says where it is,
within epochs too, with elapsed time and what is left; ``--json-log`` gives the same
lines as JSON objects, ``--quiet`` none; the end gives the verdict and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netshrink.cli import main
from netshrink.train import loop


def recipe(tmp_path: Path, fashion_dir: Path) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({
        "name": "progress", "model": {"arch": "resnet_tiny"},
        "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 50,
                 "calib_size": 16, "test_limit": 64},
        "measure": {"latency": False},
        "stages": [{"kind": "train", "epochs": 2, "batch_size": 32, "lr": 0.05},
                   {"kind": "prune.magnitude", "ratio": 0.5}]}))
    return str(path)


def test_a_log_file_tells_where_the_run_is(tmp_path, fashion_dir, capsys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "PROGRESS_LINE_SECONDS", 0.0)  # a line every step
    assert main(["run", recipe(tmp_path, fashion_dir), "--out", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().out.splitlines()
    steps = [x for x in lines if x.startswith("epoch 1/2: step ")]
    assert steps and "left in the epoch" in steps[0] and "in the stage" in steps[0]
    assert any(x.startswith("epoch 1/2: loss") and "left)" in x for x in lines)
    assert any("measuring: top-1 on the test split" in x for x in lines)
    assert "rendering the report" in lines
    assert "smaller" in lines[-2] or "verdict" in lines[-2]  # the report's headline
    assert lines[-1].startswith("finished in ") and "report.md" in lines[-1]


def test_json_log_and_quiet(tmp_path, fashion_dir, capsys) -> None:
    path = recipe(tmp_path, fashion_dir)
    assert main(["run", path, "--out", str(tmp_path / "j"), "--json-log"]) == 0
    records = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert all(set(r) == {"time", "elapsed_s", "message"} for r in records)
    assert records[-1]["message"].startswith("finished in ")
    assert records[-1]["elapsed_s"] >= records[0]["elapsed_s"]
    assert main(["--quiet", "run", path, "--out", str(tmp_path / "q")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and (tmp_path / "q" / "report.md").is_file()
    assert main(["--quiet", "run", str(tmp_path / "missing.yaml"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err  # errors still say what went wrong


def test_the_run_folder_keeps_its_own_log(tmp_path, fashion_dir, capsys) -> None:
    """``run.log`` in the run folder: every line the run showed, timestamped; a resumed
    run appends; a run refused before it owns the folder writes none."""
    path = recipe(tmp_path, fashion_dir)
    out = tmp_path / "o"
    assert main(["run", path, "--out", str(out), "--no-report"]) == 0
    shown = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    logged = (out / "run.log").read_text().splitlines()
    assert shown and all(any(x.endswith(" " + s) for x in logged) for s in shown)
    assert all(x[:4].isdigit() and x[10] == " " and x[13] == ":" for x in logged)
    assert main(["run", path, "--out", str(out), "--no-report"]) == 0  # all reused
    again = (out / "run.log").read_text().splitlines()
    assert again[:len(logged)] == logged and any("reused" in x for x in again[len(logged):])
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(path).read_text().replace(str(fashion_dir), str(tmp_path / "none")))
    assert main(["run", str(bad), "--out", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused" / "run.log").exists()
