"""Data-parallel training under torchrun: two gloo processes on this machine train as one
process does (the same global batches; batch norm over the global batch with sync_bn),
rank 0 alone writes, and an interrupted data-parallel run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from fixtures_data import write_image_folder
from netshrink.data import ArraySplit, Augment, shard_rows
from netshrink.data.imagefolder import FileSplit
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.store.checkpoint import load_model
from netshrink.train.distributed import World, rank_batches

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available")

# Two training stages: the second distils from the baseline (a teacher on every rank),
# with a batch of 51 that splits 26/25 and a last batch of two images.
RECIPE = {
    "name": "ddp",
    "model": {"arch": "resnet_tiny"},
    "data": {"name": "fashion_mnist", "val_size": 50, "calib_size": 16, "train_limit": 256,
             "test_limit": 64},
    "measure": {"latency": False},
    "stages": [
        {"kind": "train", "epochs": 1, "batch_size": 64, "lr": 0.05, "max_steps": 3,
         "sync_bn": True},
        {"kind": "finetune", "name": "kd", "epochs": 1, "batch_size": 51, "lr": 0.01,
         "sync_bn": True, "distill": {"teacher_stage": "baseline", "alpha": 0.5}},
    ],
}


def _env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "NETSHRINK_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no network needed
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", "-m", "netshrink", *args]


def _write_recipe(folder: Path, raw: dict, fashion: Path) -> Path:
    raw = json.loads(json.dumps(raw))
    raw["data"]["root"] = str(fashion)
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_process(recipe: Path, out: Path, cache: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NETSHRINK_CACHE", str(cache))
        run_recipe(parse_recipe(yaml.safe_load(recipe.read_text())), out, log=lambda _: None)


def _max_difference(a_file: Path, b_file: Path) -> float:
    """The largest |a - b| over the float tensors of two model files, relative to each
    tensor's largest magnitude (at least 1); integer buffers must be equal."""
    a, b = (load_model(f)[0].state_dict() for f in (a_file, b_file))
    assert a.keys() == b.keys()
    worst = 0.0
    for name, x in a.items():
        if not x.is_floating_point():
            assert torch.equal(x, b[name]), name
            continue
        scale = max(1.0, float(x.abs().max()))
        worst = max(worst, float((x.double() - b[name].double()).abs().max()) / scale)
    return worst


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _cache_files(cache: Path) -> list[str]:
    """The cache's files, each entry's key folders (``ab/abcd...``) left out: the keys of
    a data-parallel run differ by design."""
    names = []
    for path in cache.rglob("*"):
        if path.is_file():
            parts = path.relative_to(cache).parts
            keyed = len(parts) == 3 and parts[1].startswith(parts[0])
            names.append("<key>/" + parts[-1] if keyed else "/".join(parts))
    return sorted(names)


@dataclass
class Runs:
    one: Path  # the 1-process run folder
    two: Path  # the 2-process run folder
    one_cache: Path
    two_cache: Path
    work: Path  # the 2-process run's working directory
    output: str  # what torchrun printed (both ranks)


@pytest.fixture(scope="module")
def runs(fashion_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    root = tmp_path_factory.mktemp("ddp")
    work = root / "work"
    work.mkdir()
    recipe = _write_recipe(work, RECIPE, fashion_dir)
    one, two = root / "one", work / "two"
    _one_process(recipe, one, root / "cache1")
    proc = subprocess.run(_torchrun("run", "r.yaml", "--out", "two"), cwd=work,
                          env=_env(root / "cache2"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Runs(one=one, two=two, one_cache=root / "cache1", two_cache=root / "cache2",
                work=work, output=proc.stdout + proc.stderr)


@needs_gloo
def test_two_processes_end_with_the_one_process_weights(runs: Runs) -> None:
    record = json.loads((runs.two / "run.json").read_text())
    single = json.loads((runs.one / "run.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["baseline", "train", "kd"]
    for stage, alone in zip(record["stages"][1:], single["stages"][1:], strict=True):
        difference = _max_difference(runs.one / alone["artifact"], runs.two / stage["artifact"])
        assert difference < 1e-5, (stage["name"], difference)
        # The epoch's loss and accuracy are the global batch's (summed over the ranks).
        for h2, h1 in zip(stage["history"], alone["history"], strict=True):
            assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
            assert h2["train_top1"] == pytest.approx(h1["train_top1"])
            assert h2["val_top1"] == pytest.approx(h1["val_top1"])


@needs_gloo
def test_distilled_finetune_runs_on_every_rank(runs: Runs) -> None:
    kd = json.loads((runs.two / "run.json").read_text())["stages"][2]
    assert any(note.startswith("distilled (alpha 0.5") for note in kd["notes"])
    assert len(kd["history"]) == 1 and kd["measurement"]["accuracy"] is not None


@needs_gloo
def test_only_rank_zero_writes(runs: Runs) -> None:
    assert _files(runs.two) == _files(runs.one)
    assert _cache_files(runs.two_cache) == _cache_files(runs.one_cache) != []
    assert sorted(p.name for p in runs.work.iterdir()) == ["r.yaml", "two"]
    assert not any(".tmp" in name for name in _files(runs.two))
    # Rank 0 alone logs: each line once.
    for line in ("[1] train: done", "[2] kd: done", "epoch 1/1: loss", "report: two/report.md"):
        assert runs.output.count(line) == (2 if line == "epoch 1/1: loss" else 1), line


@needs_gloo
def test_commands_that_do_not_train_refuse_torchrun(tmp_path: Path) -> None:
    env = {**_env(tmp_path / "cache"), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-m", "netshrink", "list", "stages"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not run under torchrun" in proc.stderr


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow  # 30 s; a killed run's resume is in the default run (test_kill_resume)
@needs_gloo
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_data_parallel_training_resumes(fashion_dir: Path, tmp_path: Path) -> None:
    raw = json.loads(json.dumps(RECIPE))
    # Four epochs of 7 steps, a resumable state every few steps (0.12 s).
    raw["stages"] = [{"kind": "train", "epochs": 4, "batch_size": 32, "lr": 0.05,
                      "sync_bn": True, "eval_every": 0, "checkpoint_minutes": 0.002}]
    _write_recipe(tmp_path, raw, fashion_dir)
    command = _torchrun("run", "r.yaml", "--out", "two", "--no-report")
    env = _env(tmp_path / "cache")
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # killed once epoch 2 has ended: mid-training
        seen.append(line)
        if line.startswith("epoch 2/4"):
            break
    workers = _children(proc.pid)
    for pid in workers:  # each worker runs in a session of its own
        os.kill(pid, signal.SIGKILL)
    proc.stdout.read()
    proc.wait(timeout=120)
    assert len(workers) == 2, "".join(seen)
    state = tmp_path / "two" / "stages" / "01-train" / "train_state.safetensors"
    assert state.exists() and not (tmp_path / "two" / "stages" / "01-train" /
                                   "model.safetensors").exists(), "".join(seen)

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming training at epoch") == 1
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    train = record["stages"][1]
    assert "resumed from an interrupted run" in train["notes"]
    assert [h["epoch"] for h in train["history"]] == [1, 2, 3, 4]
    assert not state.exists()
    assert not any(".tmp" in name for name in _files(tmp_path / "two"))

    # The same run uninterrupted (its own cache: not served the resumed run's model).
    whole = subprocess.run([*command[:-2], "whole", "--no-report"], cwd=tmp_path,
                           env=_env(tmp_path / "cache-whole"), capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    difference = _max_difference(tmp_path / "whole" / train["artifact"],
                                 tmp_path / "two" / train["artifact"])
    assert difference < 1e-6, difference


def _spmd_setup() -> tuple:
    """A fresh tiny model and 9 training images: batches of 4, 4 and 1 (with two ranks,
    rank 1 has no image of the last)."""
    from netshrink.data import DataBundle, DatasetInfo
    from netshrink.models import ModelSpec, build_model
    from netshrink.train.config import TrainConfig

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet_tiny", stem="cifar", num_classes=3,
                                  in_channels=1))
    gen = torch.Generator().manual_seed(1)
    split = ArraySplit(torch.randint(0, 256, (9, 1, 12, 12), dtype=torch.uint8, generator=gen),
                       torch.arange(9) % 3, (0.5,), (0.25,), augmentation=Augment(hflip=True))
    info = DatasetInfo("toy", 3, 1, 12, ["a", "b", "c"], (0.5,), (0.25,))
    data = DataBundle(info=info, train=split, val=None, test=split, calib=split)
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=4, warmup_epochs=0, eval_every=0,
                      sync_bn=True)
    return model, data, cfg


def _spmd_worker(rank: int, port: int, folder: Path) -> None:
    from netshrink.train.loop import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    model, data, cfg = _spmd_setup()
    lines: list[str] = []
    train(model, data, cfg, progress=False, log=lines.append)
    torch.save({"state": model.state_dict(), "lines": lines}, folder / f"rank{rank}.pt")
    dist.destroy_process_group()


@needs_gloo
def test_every_rank_calling_the_loop_trains_as_one_process(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A script every rank runs (no recipe, no rank 0 leading): the loop is collective;
    a rank whose share of the last batch is empty still takes the step."""
    import socket

    import torch.multiprocessing as mp

    from netshrink.train.loop import train

    for key, value in _env(tmp_path).items():
        if key in ("GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS"):
            monkeypatch.setenv(key, value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spmd_worker, args=(port, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model, data, cfg = _spmd_setup()
    train(model, data, cfg, progress=False, log=lambda _: None)
    for name, value in model.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        scale = max(1.0, float(value.abs().max())) if value.is_floating_point() else 1.0
        assert float((ranks[0]["state"][name].double() - value.double()).abs().max()) <= (
            1e-5 * scale), name
    assert len(ranks[0]["lines"]) == 2 and ranks[1]["lines"] == []  # rank 0 alone logs


# ------------------------------------------------------------------ shares, no processes


def _union_of_shares(split: object, batch_size: int, size: int) -> list[tuple]:
    per_rank = [list(rank_batches(split, batch_size, seed=3, world=World(size, rank)))
                for rank in range(size)]
    batches = []
    for shares in zip(*per_rank, strict=True):
        assert len({n for _, _, n in shares}) == 1
        batches.append((torch.cat([x for x, _, _ in shares]),
                        torch.cat([y for _, y, _ in shares]), shares[0][2]))
    return batches


def test_shares_make_up_the_one_process_batches(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (23, 1, 12, 12), dtype=torch.uint8, generator=gen)
    arrays = ArraySplit(images, torch.arange(23), (0.5,), (0.25,),
                        augmentation=Augment(crop_padding=2, hflip=True))
    write_image_folder(tmp_path, per_class=3)
    files = sorted((tmp_path / "train").rglob("*.*"))
    folder = FileSplit(files, torch.arange(len(files)) % 3, image_size=8, mean=(0.5,) * 3,
                       std=(0.25,) * 3)
    for split, batch_size in ((arrays, 5), (folder, 4)):
        whole = list(split.batches(batch_size, shuffle=True, augment=True, seed=3))
        for size in (2, 3):
            union = _union_of_shares(split, batch_size, size)
            assert len(union) == len(whole)
            for (x, y, n), (wx, wy) in zip(union, whole, strict=True):
                assert n == len(wy) and torch.equal(y, wy) and torch.equal(x, wx)


def test_shares_differ_by_at_most_one_image() -> None:
    for n in range(0, 12):
        for size in (1, 2, 3, 5):
            rows = [shard_rows(n, rank, size) for rank in range(size)]
            sizes = [r.stop - r.start for r in rows]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            assert [r.start for r in rows] == [sum(sizes[:i]) for i in range(size)]
