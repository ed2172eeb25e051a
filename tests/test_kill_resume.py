"""A run killed outright (SIGKILL, no chance to clean up) mid-stage resumes: finished
stages are reused, the interrupted training continues from its last saved state, and no
half-written file is left in the run folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from netshrink.recipe import load_recipe, run_recipe
from netshrink.store.checkpoint import load_model


def test_sigkill_mid_training_then_rerun_resumes(fashion_dir, tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "killed", "model": {"arch": "resnet_tiny"},
        "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 100,
                 "calib_size": 32},
        "measure": {"latency": False, "batch_size": 16},
        "stages": [
            {"kind": "train", "name": "teacher", "epochs": 2, "lr": 0.05, "batch_size": 32},
            # Saves a resumable state every ~0.1 s, so the kill lands after one.
            {"kind": "distill.kd", "name": "student", "student": {"arch": "resnet_tiny"},
             "epochs": 8, "lr": 0.05, "batch_size": 32, "eval_every": 0,
             "checkpoint_minutes": 0.002},
        ],
    }))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "netshrink.cli", "run", str(recipe),
                             "--out", str(out), "--no-report"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ)
    state = out / "stages" / "02-student" / "train_state.safetensors"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a few more saves: the kill may land in the middle of one
    if proc.poll() is not None:
        pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()!r}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    lines: list[str] = []
    record = run_recipe(load_recipe(recipe), out, log=lines.append, report=False)
    assert [s.name for s in record.stages] == ["baseline", "teacher", "student"]
    assert sum("finished before, reused" in line for line in lines) == 2
    assert any(line.startswith("resuming training at epoch") for line in lines)
    student = record.stages[2]
    assert "resumed from an interrupted run" in student.notes
    assert [h.epoch for h in student.history] == list(range(1, 9))
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert not state.exists()  # the stage finished: its resumable state is gone
    for stage in record.stages:
        load_model(out / stage.artifact)  # every file loads back whole
