"""``kill -9`` at random moments, and at the worst ones (halfway through writing a model
file, halfway through copying a model out of the cache), again and again into one run
folder: each rerun resumes, no half-written file is ever left, and the final weights are
bit-identical to a run that was never interrupted.

The default run kills five times; ``NETSHRINK_KILLS=25 pytest -m slow`` runs the long
version (the issue's "at least 20").
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from netshrink.store.checkpoint import read_state_dict

# Runs netshrink in a subprocess that SIGKILLs itself at the N-th call of a chosen write:
# "model" halfway through writing a model file's bytes, "cache" after linking a cached
# file to its temporary name and before the rename. No hook in netshrink itself.
KILLER = '''
import os, signal, sys
point, nth = sys.argv[1], int(sys.argv[2])
calls = 0

def due():
    global calls
    calls += 1
    return calls == nth

if point == "model":
    import netshrink.store.checkpoint as checkpoint
    from netshrink.store.atomic import temp_path
    real = checkpoint.atomic_write_bytes
    def half_then_die(path, data):
        if due():
            with open(temp_path(path), "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
    checkpoint.atomic_write_bytes = half_then_die
elif point == "cache":
    import netshrink.recipe.cache as cache
    from netshrink.store.atomic import temp_path
    real_place = cache._place
    def link_then_die(src, dest):
        if due():
            os.link(src, temp_path(dest))
            os.kill(os.getpid(), signal.SIGKILL)
        real_place(src, dest)
    cache._place = link_then_die
from netshrink.cli import main
sys.exit(main(sys.argv[3:]))
'''


def recipe(fashion: Path, epochs: int = 2) -> dict:
    return {
        "name": "killed",
        "model": {"arch": "resnet_tiny"},
        "data": {"name": "fashion_mnist", "root": str(fashion), "val_size": 60,
                 "calib_size": 16, "train_limit": 400, "test_limit": 100},
        "measure": {"latency": False},
        "stages": [
            # A resumable state every few batches: kills land before, in and after them.
            {"kind": "train", "epochs": epochs, "batch_size": 32, "lr": 0.05,
             "checkpoint_minutes": 0.0005},
            {"kind": "prune.magnitude", "ratio": 0.5},
            {"kind": "finetune", "epochs": 1, "batch_size": 32, "lr": 0.01,
             "checkpoint_minutes": 0.0005},
        ],
    }


def start(tmp: Path, recipe_file: Path, out: Path, cache: Path, point: str = "none",
          nth: int = 0) -> subprocess.Popen:
    killer = tmp / "killer.py"
    killer.write_text(KILLER)
    env = {**os.environ, "NETSHRINK_CACHE": str(cache), "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, str(killer), point, str(nth), "run",
                             str(recipe_file), "--out", str(out), "--no-report"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    record = json.loads((out / "run.json").read_text())
    return {s["name"]: read_state_dict(out / s["artifact"])[0] for s in record["stages"]}


def assert_whole(out: Path) -> None:
    """Every file of the finished run is whole: no temporary file, every model loads."""
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [], leftovers
    for path in out.rglob("*.safetensors"):
        read_state_dict(path)


def finish_and_compare(tmp: Path, recipe_file: Path, out: Path, cache: Path,
                       expected: dict[str, dict[str, torch.Tensor]]) -> None:
    proc = start(tmp, recipe_file, out, cache)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert_whole(out)
    got = weights(out)
    assert got.keys() == expected.keys()
    for stage, tensors in expected.items():
        assert got[stage].keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert torch.equal(got[stage][name], tensor), (out.name, stage, name)


def kill_again_and_again(fashion: Path, tmp: Path, kills: int, seed: int,
                         epochs: int = 2) -> None:
    recipe_file = tmp / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe(fashion, epochs)))
    # The reference: never interrupted, no cache.
    t0 = time.monotonic()
    ref = start(tmp, recipe_file, tmp / "reference", tmp / "ref-cache")
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    full = time.monotonic() - t0
    expected = weights(tmp / "reference")

    cache = tmp / "cache"
    rng = random.Random(seed)
    # The worst moments first (a model file half written: the baseline's, then the
    # trained stage's), then random ones; each rerun resumes what the last one left. A
    # run that finishes before its kill is checked, and the kills go on in a new folder
    # (whose stages the cache now serves: kills land in cache copies too).
    folders = [tmp / "killed-0"]
    landed = 0
    for point, nth in [("model", 1), ("model", 2)]:
        proc = start(tmp, recipe_file, folders[-1], cache, point, nth)
        assert proc.wait(timeout=600) == -signal.SIGKILL, proc.stderr.read()
        landed += 1
    attempts = 0
    while landed < kills and attempts < 4 * kills:
        attempts += 1
        proc = start(tmp, recipe_file, folders[-1], cache)
        time.sleep(rng.uniform(0.2, 0.8 * full))
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=600)
        if code == -signal.SIGKILL:
            landed += 1
            continue
        assert code == 0, proc.stderr.read()
        finish_and_compare(tmp, recipe_file, folders[-1], cache, expected)
        folders.append(tmp / f"killed-{len(folders)}")
    finish_and_compare(tmp, recipe_file, folders[-1], cache, expected)
    # Cache copies: a fresh folder whose stages all come from the cache the run above
    # filled, killed in the middle of its first and second copy out of it.
    cache_out = tmp / "from-cache"
    for nth in (1, 2):
        proc = start(tmp, recipe_file, cache_out, cache, "cache", nth)
        code = proc.wait(timeout=600)
        assert code == -signal.SIGKILL, proc.stderr.read()  # it reached a cache copy
        landed += 1
    finish_and_compare(tmp, recipe_file, cache_out, cache, expected)
    assert landed >= kills
    print(f"{landed} kills landed ({attempts} random tries) over {len(folders) + 1} run "
          f"folders; the reference run took {full:.1f} s")


@pytest.mark.slow  # ~30 s; the default run keeps test_kill_resume's SIGKILL mid-training
def test_killed_at_the_worst_moments_resumes_bit_identical(fashion_dir, tmp_path) -> None:
    # One random kill and the two cache copies here; 25 random ones in the next test.
    kill_again_and_again(fashion_dir, tmp_path, kills=1, seed=0)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 25 kills and their reruns: about 10 minutes on 2 cores
def test_killed_many_times_at_random_resumes_bit_identical(fashion_dir, tmp_path) -> None:
    kills = int(os.environ.get("NETSHRINK_KILLS", "25"))
    # Longer training, so that most random moments fall in the work, not the start-up.
    kill_again_and_again(fashion_dir, tmp_path, kills=kills, seed=1, epochs=12)
