"""Studies: a matrix expanded into validated cells, run through the cache into an SQLite
results store that survives a kill and concurrent writers, and read by the report, the
CSV export and ``netshrink study show``."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netshrink.cli import main
from netshrink.errors import UserError
from netshrink.stages.record import RunRecord
from netshrink.study import ResultsStore, parse_study, run_study
from netshrink.study.execute import _dependencies

STAGE_TRAIN = {"kind": "train", "name": "train", "epochs": 1, "batch_size": 64, "lr": 0.05,
               "max_steps": 3}


def study_dict(root: Path, ratios: list[float] | None = None) -> dict:
    return {
        "name": "tiny-study",
        "recipe": {
            "model": {"arch": "resnet_tiny"},
            "data": {"name": "fashion_mnist", "root": str(root), "val_size": 50,
                     "calib_size": 16, "test_limit": 100},
            "measure": {"latency": False},
            "stages": [STAGE_TRAIN],
        },
        "matrix": {
            "method": {
                "fine": {"stages": [{"kind": "prune.magnitude", "name": "prune",
                                     "from": "train", "ratio": "${ratio}"}]},
                "channel": {"stages": [{"kind": "prune.channel", "name": "prune",
                                        "from": "train", "ratio": "${ratio}"}]},
            },
            "ratio": ratios or [0.3, 0.5],
        },
        "report": {"accuracy_budget": 2.0},
    }


# ------------------------------------------------------------------ expansion


def test_cells_are_the_matrix_with_typed_placeholders(fashion_dir: Path) -> None:
    study = parse_study(study_dict(fashion_dir))
    assert [c.name for c in study.cells] == ["fine-0.3", "fine-0.5", "channel-0.3",
                                             "channel-0.5"]
    cell = study.cells[3]
    assert cell.axes == {"method": "channel", "ratio": "0.5"}
    prune = cell.recipe.parsed_stages()[1]
    assert prune.kind == "prune.channel" and prune.config.ratio == 0.5  # a number, not text
    assert cell.recipe.name == "tiny-study.channel-0.5"


def test_set_merges_exclude_drops_and_identical_cells_merge(fashion_dir: Path) -> None:
    raw = study_dict(fashion_dir)
    raw["matrix"] = {
        "model": {"tiny": {"set": {"model": {"arch": "resnet_tiny"}}},
                  "r18": {"set": {"model": {"arch": "resnet18", "stem": "cifar"}}}},
        "method": {"dense": {}, "fine": raw["matrix"]["method"]["fine"]},
        "ratio": [0.3, 0.5],
    }
    raw["exclude"] = [{"model": "r18", "ratio": 0.5}]
    study = parse_study(raw)
    names = [c.name for c in study.cells]
    # dense ignores the ratio: dense-0.5 is dense-0.3's recipe, run and stored once
    assert names == ["tiny-dense-0.3", "tiny-fine-0.3", "tiny-fine-0.5", "r18-dense-0.3",
                     "r18-fine-0.3"]
    assert study.merged == {"tiny-dense-0.3": ["tiny-dense-0.5"]}
    r18 = study.cells[3].recipe
    assert r18.model.arch == "resnet18" and r18.model.stem == "cifar"
    assert r18.data.test_limit == 100  # the merge kept the rest of the recipe


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["matrix"]["method"]["fine"]["stages"][0].update(ratio="${ratoi}"),
     "${ratoi} names no axis"),
    (lambda r: r.update(colour="red"), "unknown key 'colour'"),
    (lambda r: r["matrix"]["method"]["fine"].update(stage=[]), "unknown key"),
    (lambda r: r.update(exclude=[{"methd": "fine"}]), "'methd' is not an axis"),
    (lambda r: r.update(exclude=[{"method": "coarse"}]), "'coarse' is not a value"),
    (lambda r: r["matrix"].update(ratio=[0.3, 1.5]), "cell fine-1.5"),
    (lambda r: r["matrix"].update(ratio=[]), "at least one value"),
    (lambda r: r["matrix"].update(ratio=["a/b"]), "not a valid name"),
    (lambda r: r.update(exclude=[{"ratio": 0.3}, {"ratio": 0.5}]), "every cell is excluded"),
    (lambda r: r["matrix"].update(seed=list(range(1001))), "more than 1000 cells"),
])
def test_a_bad_study_is_one_clear_error(fashion_dir: Path, change, message: str) -> None:
    raw = study_dict(fashion_dir)
    change(raw)
    with pytest.raises(UserError, match=message.replace("$", r"\$").replace("{", r"\{")):
        parse_study(raw, source="s.yaml")


def test_owners_make_shared_stages_before_their_users(fashion_dir: Path) -> None:
    raw = study_dict(fashion_dir)
    raw["matrix"]["model"] = {"a": {"set": {"seed": 1}}, "b": {"set": {"seed": 2}}}
    study = parse_study(raw)
    needs = _dependencies(study.cells)
    # each seed's first cell trains; its other cells wait for it and only for it
    assert needs["fine-0.3-a"] == set() and needs["fine-0.3-b"] == set()
    assert needs["channel-0.5-a"] == {"fine-0.3-a"}
    assert needs["channel-0.5-b"] == {"fine-0.3-b"}


# ------------------------------------------------------------------ the results store


def _fake_record(cell: str, n: int) -> RunRecord:
    from netshrink.bench.schema import Accuracy, Environment, Measurement
    from netshrink.stages.record import StageRecord

    env = Environment(cpu="test", cores=2, threads=2, seed=0, python="3", versions={},
                      platform="x")
    stages = [StageRecord(index=i, name=f"s{i}", kind="train", key=f"{cell}{i}",
                          started="t", measurement=Measurement(
                              input_shape=[1, 8, 8], params=10, nonzero_params=10,
                              accuracy=Accuracy(split="test", images=10, top1=i / 10, top5=1),
                              environment=env))
              for i in range(n)]
    return RunRecord(name=cell, recipe={}, recipe_sha256="x", netshrink_version="0",
                     created="t", updated="t", stages=stages)


def _writer(db: str, worker: int, cells: int) -> None:
    with ResultsStore(Path(db)) as store:
        for k in range(cells):
            name = f"w{worker}-c{k}"
            record = _fake_record(name, 3)
            store.record_cell("concurrent", name, {"w": str(worker)}, "x", "f", record.stages,
                              1.0)


def test_concurrent_writers_lose_no_row(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite"
    ResultsStore(db).close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(str(db), w, 25)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    with ResultsStore(db) as store:
        assert len(store.cells("concurrent")) == 100
        assert len(store.rows("concurrent")) == 300
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_recording_a_cell_again_replaces_its_rows(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.record_cell("s", "c", {}, "x", "f", _fake_record("c", 3).stages, 1.0)
        store.record_cell("s", "c", {}, "y", "f", _fake_record("c", 2).stages, 1.0)
        assert [r["stage"] for r in store.rows("s")] == ["s0", "s1"]
        assert store.cells("s")[0].recipe_sha256 == "y"


def test_a_file_that_is_not_a_results_database_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "notes.sqlite"
    bad.write_text("my notes, not a database\n" * 100)
    with pytest.raises(UserError, match="not a netshrink results database"):
        ResultsStore(bad)
    assert bad.read_text().startswith("my notes")  # untouched
    with pytest.raises(UserError, match="no results database"):
        ResultsStore(tmp_path / "absent.sqlite", create=False)


# ------------------------------------------------------------------ running a study


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory, fashion_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("study") / "out"
    run_study(parse_study(study_dict(fashion_dir)), out, log=lambda _: None)
    return out


def test_a_study_records_one_row_per_measured_stage(finished_study: Path) -> None:
    with ResultsStore(finished_study / "results.sqlite") as store:
        rows = store.rows("tiny-study")
        cells = store.cells("tiny-study")
    assert sorted(c.cell for c in cells) == ["channel-0.3", "channel-0.5", "fine-0.3",
                                             "fine-0.5"]
    assert len(rows) == 4 * 3  # baseline, train, prune in each cell
    for row in rows:
        run = json.loads((finished_study / "cells" / row["cell"] / "run.json").read_text())
        stage = next(s for s in run["stages"] if s["name"] == row["stage"])
        assert row["stage_key"] == stage["key"]
        assert json.loads(row["config"]) == stage["config"]
        assert json.loads(row["hardware"])["cores"] >= 1 and row["seed"] == 0
    # one trained model for all four cells: made once, then taken from the cache
    trains = {r["stage_key"] for r in rows if r["stage"] == "train"}
    assert len(trains) == 1
    notes = [json.loads((finished_study / "cells" / c / "run.json").read_text())["stages"][1]
             ["notes"] for c in ("fine-0.5", "channel-0.3")]
    assert all(any("taken from the cache" in n or "not recomputed" in n for n in ns)
               for ns in notes)
    assert all(any("reused from an earlier run" in n for n in ns) for ns in notes)
    channel = {r["cell"]: r for r in rows if r["stage"] == "prune"}
    assert channel["channel-0.5"]["params"] < channel["channel-0.3"]["params"]
    assert channel["fine-0.5"]["nonzero_params"] < channel["fine-0.3"]["nonzero_params"]


def test_the_report_and_show_read_the_store(finished_study: Path, capsys) -> None:
    report = (finished_study / "report.md").read_text()
    assert "netshrink study: tiny-study" in report
    for name in ("channel-0.5/prune", "fine-0.3/prune", "| train |"):
        assert name in report
    assert report.count("| train |") == 2  # shared: one row (comparison + measured-how)
    assert (finished_study / "report_files" / "size_vs_accuracy.png").is_file()
    assert main(["study", "show", str(finished_study)]) == 0
    shown = capsys.readouterr().out
    assert "channel-0.5/prune" in shown and shown.startswith("Within 2 points of train")
    assert main(["study", "show", str(finished_study), "--csv",
                 str(finished_study.parent / "rows.csv")]) == 0
    rows = list(csv.DictReader((finished_study.parent / "rows.csv").open()))
    assert len(rows) == 12 and {"top1", "size_bytes", "config", "versions"} <= set(rows[0])


def test_a_rerun_runs_nothing_and_a_new_value_runs_one_cell(
        finished_study: Path, fashion_dir: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished_study, out)
    # the copy's store says where it lives; point it at the copy
    record = json.loads((out / "study.json").read_text())
    record["db"] = str(out / "results.sqlite")
    (out / "study.json").write_text(json.dumps(record))
    again = run_study(parse_study(study_dict(fashion_dir)), out, log=lambda _: None)
    assert again.ran == [] and len(again.skipped) == 4
    more = run_study(parse_study(study_dict(fashion_dir, [0.3, 0.5, 0.7])), out,
                     log=lambda _: None)
    assert sorted(more.ran) == ["channel-0.7", "fine-0.7"]
    with ResultsStore(out / "results.sqlite") as store:
        assert len(store.rows("tiny-study")) == 6 * 3


@pytest.mark.slow  # 10 s: two spawned workers each import torch
def test_a_pool_of_workers_gives_the_same_rows(finished_study: Path, fashion_dir: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "pool"
    run_study(parse_study(study_dict(fashion_dir)), out, workers=2, log=lambda _: None)
    keep = ("cell", "stage", "stage_key", "top1", "params", "nonzero_params", "macs")

    def rows(db: Path) -> list[tuple]:
        with ResultsStore(db) as store:
            return [tuple(r[k] for k in keep) for r in store.rows("tiny-study")]

    assert rows(out / "results.sqlite") == rows(finished_study / "results.sqlite")


@pytest.mark.slow  # a local Ray cluster takes ~10 s to start
def test_a_ray_cluster_gives_the_same_rows(finished_study: Path, fashion_dir: Path,
                                           tmp_path: Path) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    outcome = run_study(parse_study(study_dict(fashion_dir)), out, workers=2,
                        executor="ray", log=lambda _: None)
    assert sorted(outcome.ran) == ["channel-0.3", "channel-0.5", "fine-0.3", "fine-0.5"]
    keep = ("cell", "stage", "stage_key", "top1", "params", "nonzero_params", "macs")
    with ResultsStore(out / "results.sqlite") as a, \
            ResultsStore(finished_study / "results.sqlite") as b:
        assert [tuple(r[k] for k in keep) for r in a.rows("tiny-study")] == \
            [tuple(r[k] for k in keep) for r in b.rows("tiny-study")]


def test_study_out_must_be_a_study_folder(tmp_path: Path, fashion_dir: Path,
                                          capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps(study_dict(fashion_dir)))
    assert main(["study", str(spec), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "not a netshrink study folder" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    spec.write_text("name: x\nmatrix: {a: [1]}\nrecipe: {stages: [{kind: nope}]}\n")
    assert main(["study", str(spec), "--out", str(tmp_path / "new")]) == 2
    assert "unknown stage kind 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_study_killed_mid_cell_resumes_without_losing_or_repeating_rows(
        tmp_path: Path, fashion_dir: Path) -> None:
    raw = study_dict(fashion_dir)
    raw["recipe"]["stages"][0] = dict(STAGE_TRAIN, max_steps=40)  # a cell lasts seconds
    raw["matrix"]["ratio"] = [0.3]
    raw["matrix"]["model"] = {"a": {"set": {"seed": 1}}, "b": {"set": {"seed": 2}}}
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps(raw))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "netshrink", "study", str(spec), "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    second = out / "cells" / "fine-0.3-b" / "run.json"  # the 2nd cell is running
    deadline = time.time() + 240
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with ResultsStore(out / "results.sqlite") as store:
        before = [c.cell for c in store.cells("tiny-study")]
        first_rows = store.rows("tiny-study")
    assert before == ["fine-0.3-a"] and len(first_rows) == 3
    first_run = (out / "cells" / "fine-0.3-a" / "run.json").read_bytes()
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 recorded before, 3 to run" in resumed.stdout
    assert (out / "cells" / "fine-0.3-a" / "run.json").read_bytes() == first_run
    with ResultsStore(out / "results.sqlite") as store:
        rows = store.rows("tiny-study")
        assert len(store.cells("tiny-study")) == 4
    assert len(rows) == 4 * 3
    assert len({(r["cell"], r["stage"]) for r in rows}) == len(rows)
    assert [r for r in rows if r["cell"] == "fine-0.3-a"] == first_rows
