"""The walls around the user's files on the good paths: a run removes only what it made,
the cache only its own entries, a diverged training saves nothing, and ``eval --split
val`` scores exactly the images the run held out."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from netshrink.cli import main
from netshrink.recipe.cache import ModelCache
from netshrink.store.checkpoint import load_model


def tiny_recipe(fashion: Path, stages: list[dict]) -> dict:
    return {
        "name": "walls",
        "model": {"arch": "resnet_tiny"},
        "data": {"name": "fashion_mnist", "root": str(fashion), "val_size": 60,
                 "calib_size": 16, "train_limit": 300, "test_limit": 100},
        "measure": {"latency": False},
        "stages": stages,
    }


def write(path: Path, raw: dict) -> str:
    path.write_text(json.dumps(raw))
    return str(path)


TRAIN = {"kind": "train", "epochs": 1, "batch_size": 64, "lr": 0.05, "max_steps": 3}
PRUNE = {"kind": "prune.magnitude", "ratio": 0.5}


def test_a_rerun_removes_only_the_stage_folders_it_made(fashion_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", write(tmp_path / "a.yaml", tiny_recipe(fashion_dir, [TRAIN, PRUNE])),
                 "--out", str(out), "--no-report"]) == 0
    assert (out / "stages" / "02-prune.magnitude").is_dir()
    mine = out / "stages" / "my-experiments" / "results.csv"
    mine.parent.mkdir()
    mine.write_text("a,b\n")
    lookalike = out / "stages" / "07-notes"  # named like a stage folder, made by the user
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("keep")
    # The prune stage leaves the recipe: its folder goes, the user's files stay.
    assert main(["run", write(tmp_path / "b.yaml", tiny_recipe(fashion_dir, [TRAIN])),
                 "--out", str(out), "--no-report"]) == 0
    assert not (out / "stages" / "02-prune.magnitude").exists()
    assert mine.read_text() == "a,b\n" and (lookalike / "keep.txt").read_text() == "keep"
    record = json.loads((out / "run.json").read_text())
    assert record["folders"] == ["00-baseline", "01-train"]


def test_a_folder_in_the_way_that_the_run_did_not_make_is_refused(
        fashion_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    recipe = write(tmp_path / "a.yaml", tiny_recipe(fashion_dir, [TRAIN]))
    assert main(["run", recipe, "--out", str(out), "--no-report"]) == 0
    # A user's folder exactly where a newly added stage would go.
    (out / "stages" / "02-prune.magnitude").mkdir()
    (out / "stages" / "02-prune.magnitude" / "mine.txt").write_text("mine")
    capsys.readouterr()
    code = main(["run", write(tmp_path / "b.yaml", tiny_recipe(fashion_dir, [TRAIN, PRUNE])),
                 "--out", str(out), "--no-report"])
    err = capsys.readouterr().err
    assert code == 2 and "was not made by this run" in err, err
    assert (out / "stages" / "02-prune.magnitude" / "mine.txt").read_text() == "mine"


def test_cache_prune_removes_only_what_the_cache_made(tmp_path, capsys, monkeypatch) -> None:
    root = tmp_path / "cache"
    monkeypatch.setenv("NETSHRINK_CACHE", str(root))
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    cache = ModelCache(root)
    key = "ab" + "0" * 62
    cache.put(key, model, {"run": "r", "stage": "s", "kind": "train", "history": []})
    old = time.time() - 10 * 86_400
    foreign = [root / "ab" / ".git", root / ".git", root / "zz" / ".old-thing",
               root / "ab" / ("cd" + "1" * 62)]  # wrong prefix folder: not an entry
    for folder in foreign:
        folder.mkdir(parents=True)
        (folder / "stage.json").write_text(json.dumps({"sha256": "x", "history": []}))
        os.utime(folder, (old, old))
    stale = root / "ab" / ".abcdef012345-x1y2z3"  # an interrupted write of the cache's own
    stale.mkdir()
    os.utime(stale, (old, old))
    bad_history = root / "cd" / ("cd" + "2" * 62)
    bad_history.mkdir(parents=True)
    (bad_history / "model.safetensors").write_bytes(b"w")
    (bad_history / "stage.json").write_text(json.dumps({"sha256": "x", "history": [{"a": 1}]}))
    assert cache.get(bad_history.name) is None  # never served
    assert main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert not (root / "ab" / key).exists() and not stale.exists()
    for folder in [*foreign, bad_history]:
        assert folder.is_dir(), folder


def test_a_diverged_training_is_an_error_and_saves_no_model(
        fashion_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    stage = {**TRAIN, "lr": 1e30, "optimizer": "sgd", "warmup_epochs": 0}
    code = main(["run", write(tmp_path / "a.yaml", tiny_recipe(fashion_dir, [stage])),
                 "--out", str(out), "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "training diverged" in err[0], err
    assert not (out / "stages" / "01-train" / "model.safetensors").exists()


def test_eval_val_scores_the_images_the_run_held_out(fashion_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    stage = {**TRAIN, "max_steps": 5}
    assert main(["run", write(tmp_path / "a.yaml", tiny_recipe(fashion_dir, [stage])),
                 "--out", str(out), "--no-report"]) == 0
    record = json.loads((out / "run.json").read_text())
    last_epoch = record["stages"][1]["history"][-1]
    weights = out / "stages" / "01-train" / "model.safetensors"
    split = load_model(weights)[2]["split"]
    assert split == {"val_size": 60, "seed": 0, "train_limit": 300, "augment": split["augment"],
                     "test_limit": 100}
    assert isinstance(split["augment"], bool)
    capsys.readouterr()
    assert main(["eval", "--weights", str(weights), "--split", "val",
                 "--data-dir", str(fashion_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 60 and result["split"] == "val"
    assert result["top1"] == pytest.approx(last_epoch["val_top1"])


def test_eval_on_another_dataset_says_so(fashion_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", write(tmp_path / "a.yaml", tiny_recipe(fashion_dir, [TRAIN])),
                 "--out", str(out), "--no-report"]) == 0
    weights = str(out / "stages" / "01-train" / "model.safetensors")
    capsys.readouterr()
    # digits is 8x8 with 10 classes: the same class count, another dataset.
    assert main(["eval", "--weights", weights, "--data", "digits"]) == 0
    captured = capsys.readouterr()
    assert "was trained on fashion_mnist; evaluating it on digits" in captured.err
    assert json.loads(captured.out)["trained_on"] == "fashion_mnist"
