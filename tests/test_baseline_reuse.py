"""One-off commands measure a weights file's baseline once: the same file (by content),
settings and machine reuse that measurement, anything else is measured again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import netshrink.recipe.measuring as measuring
from netshrink.recipe import parse_recipe, run_recipe


@pytest.fixture(autouse=True)
def _quick(quick_timing: None) -> None:
    """What is tested is which measurement is taken, not its figures."""


def recipe(fashion: Path, weights: Path, **measure: object) -> object:
    return parse_recipe({
        "name": "once", "model": {"arch": "resnet_tiny", "weights": str(weights)},
        "data": {"name": "fashion_mnist", "root": str(fashion), "val_size": 0,
                 "calib_size": 16, "test_limit": 64},
        "measure": {"batch_size": 4, **measure},
        "stages": [{"kind": "prune.magnitude", "ratio": 0.5}],
    })


@pytest.fixture(scope="module")
def weights(fashion_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    record = run_recipe(parse_recipe({
        "name": "w", "model": {"arch": "resnet_tiny"},
        "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 0},
        "measure": {"latency": False},
        "stages": [{"kind": "train", "epochs": 1, "max_steps": 2, "batch_size": 32}]}),
        out / "run", log=lambda _: None, report=False, use_cache=False)
    return out / "run" / record.stages[-1].artifact


def run(fashion: Path, weights: Path, out: Path, **measure: object):
    return run_recipe(recipe(fashion, weights, **measure), out, log=lambda _: None,
                      report=False, reuse_baseline_measurement=True)


def test_the_same_file_is_measured_once(fashion_dir, weights, tmp_path, monkeypatch) -> None:
    first = run(fashion_dir, weights, tmp_path / "a").stages[0]
    copy = tmp_path / "copy.safetensors"  # the same bytes under another name
    shutil.copyfile(weights, copy)
    second = run(fashion_dir, copy, tmp_path / "b").stages[0]
    assert first.measurement.latency is not None
    assert second.measurement.latency == first.measurement.latency  # taken, not re-timed
    assert second.measurement.accuracy == first.measurement.accuracy
    assert second.measurement.file == "stages/00-baseline/model.safetensors"
    assert any("reused from an earlier run" in n for n in second.notes)
    assert not any("reused" in n for n in first.notes)


def test_another_machine_or_setting_measures_again(fashion_dir, weights, tmp_path,
                                                   monkeypatch) -> None:
    run(fashion_dir, weights, tmp_path / "a")
    other = run(fashion_dir, weights, tmp_path / "b", batch_size=8).stages[0]
    assert not any("reused" in n for n in other.notes)  # other measure settings
    real = measuring.environment

    def elsewhere(**kwargs):
        return real(**kwargs).model_copy(update={"cpu": "another CPU"})

    monkeypatch.setattr(measuring, "environment", elsewhere)
    moved = run(fashion_dir, weights, tmp_path / "c").stages[0]
    assert not any("reused" in n for n in moved.notes)  # another machine's timing


def test_without_the_flag_every_run_measures(fashion_dir, weights, tmp_path) -> None:
    for name in ("a", "b"):
        record = run_recipe(recipe(fashion_dir, weights), tmp_path / name, log=lambda _: None,
                            report=False)
        assert not any("reused" in n for n in record.stages[0].notes)


def test_cache_clear_removes_kept_measurements_only(tmp_path, monkeypatch, capsys) -> None:
    from netshrink.cli import main
    from netshrink.recipe.cache import MEASUREMENTS_DIR

    root = tmp_path / "cache"
    monkeypatch.setenv("NETSHRINK_CACHE", str(root))
    folder = root / MEASUREMENTS_DIR
    folder.mkdir(parents=True)
    kept, mine = folder / ("ab" * 32 + ".json"), folder / "notes.json"
    kept.write_text("{}")
    mine.write_text("{}")
    assert main(["cache", "clear"]) == 0
    assert not kept.exists() and mine.exists()


def test_the_cli_measures_a_files_baseline_once(fashion_dir, weights, tmp_path) -> None:
    import json

    from netshrink.cli import main

    for name in ("a", "b"):
        assert main(["prune", "--weights", str(weights), "--method", "magnitude",
                     "--ratio", "0.5", "--data-dir", str(fashion_dir),
                     "--out", str(tmp_path / name)]) == 0
    notes = [json.loads((tmp_path / n / "run.json").read_text())["stages"][0]["notes"]
             for n in ("a", "b")]
    assert not any("reused" in x for x in notes[0])
    assert any("reused from an earlier run" in x for x in notes[1])
