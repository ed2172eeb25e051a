"""Hostile input to studies: the study file, its folder's ``study.json``, the results
store (``results.sqlite``, or a user's own database named by ``--db`` or a
``study.json``), and the flags of ``study run`` / ``study show``.

One table in the style of ``test_hostile_runs``: each case builds its files in the test's
own folder and names the command; every case must exit 2 with one line
``netshrink: error: ...``, no traceback, and no byte changed anywhere (a store opened by
``study show`` is only read: not even a ``-wal``/``-shm`` file may appear). Then the
behaviours the table cannot show (a real store left byte for byte, a live writer, old
relative records, the bounds and how to raise them), and fuzzing of the three readers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st

from netshrink.cli import main
from netshrink.errors import UserError
from netshrink.study import ResultsStore, load_study, parse_study, run_study
from netshrink.study import results as results_module
from netshrink.study.execute import MAX_WORKERS_PER_CORE, check_workers, write_study_record
from netshrink.study.report import read_study_record, recorded_db, study_content
from netshrink.study.results import COLUMNS, STUDY_FOLDER_KEY
from netshrink.study.schema import MAX_CELLS, STUDY_MB_ENV
from test_fuzz_readers import SLOW, fuzz, json_value, mutated
from test_hostile_runs import assert_refused_untouched, snapshot

TRAIN = {"kind": "train", "name": "train", "epochs": 1, "batch_size": 64, "lr": 0.05,
         "max_steps": 2}


def study_dict(root: Path, name: str = "tiny-study") -> dict:
    """A one-cell study of a tiny model: a real store in a few seconds."""
    return {
        "name": name,
        "recipe": {
            "model": {"arch": "resnet_tiny"},
            "data": {"name": "fashion_mnist", "root": str(root), "val_size": 50,
                     "calib_size": 16, "train_limit": 200, "test_limit": 100},
            "measure": {"latency": False},
            "stages": [TRAIN],
        },
        "matrix": {"method": {"fine": {"stages": [
            {"kind": "prune.magnitude", "name": "prune", "from": "train", "ratio": "${ratio}"}]}},
            "ratio": [0.5]},
        "report": {"accuracy_budget": 2.0},
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, fashion_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("finished") / "study"
    run_study(parse_study(study_dict(fashion_dir)), out, log=lambda _: None)
    return out


@dataclass
class Env:
    """The folder a case builds in: the dataset, a finished study to copy, a victim."""

    tmp: Path
    fashion: Path
    finished: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "study"

    @property
    def victim(self) -> Path:
        return self.tmp / "victim"

    def study_file(self, raw: dict | str | None = None, name: str = "s.yaml") -> str:
        raw = study_dict(self.fashion) if raw is None else raw
        path = self.tmp / name
        path.write_text(raw if isinstance(raw, str) else json.dumps(raw))  # JSON is YAML
        return str(path)

    def copy(self) -> Path:
        """The finished study as ``out``, its record naming its own store."""
        shutil.copytree(self.finished, self.out)
        self.edit_record(lambda r: r.update(db=str(self.out / "results.sqlite")))
        return self.out

    def edit_record(self, edit: Callable[[dict], Any]) -> None:
        record = json.loads((self.out / "study.json").read_text())
        edit(record)
        (self.out / "study.json").write_text(json.dumps(record))

    def sql(self, *statements: str, db: Path | None = None) -> Path:
        """Run ``statements`` on ``db`` (the copy's store), leaving it as one file."""
        db = db or self.out / "results.sqlite"
        con = sqlite3.connect(db)
        con.execute("PRAGMA writable_schema=OFF")
        for statement in statements:
            con.execute(statement)
        con.commit()
        con.execute("PRAGMA journal_mode=DELETE")  # no -wal left beside it
        con.close()
        return db

    def user_db(self, wal: bool = False) -> Path:
        """A user's own SQLite database, nothing netshrink wrote."""
        self.victim.mkdir(exist_ok=True)
        path = self.victim / "mine.sqlite"
        con = sqlite3.connect(path)
        if wal:
            con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        con.execute("INSERT INTO notes (text) VALUES ('keep me')")
        con.commit()
        con.close()
        return path

    def user_file(self, text: str = "my notes\n") -> Path:
        self.victim.mkdir(exist_ok=True)
        path = self.victim / "notes.txt"
        path.write_text(text)
        return path


def _show(env: Env, *extra: str) -> list[str]:
    return ["study", "show", str(env.out), *extra]


def _run(env: Env, *extra: str, study: str | None = None) -> list[str]:
    return ["study", "run", study or env.study_file(), "--out", str(env.out), *extra]


# ------------------------------------------------------------------ hostile stores

def _recursive_view_store(env: Env) -> None:
    """16 KB: netshrink's meta and cells, and ``rows`` a view that never ends."""
    env.copy()
    db = env.out / "results.sqlite"
    db.unlink()
    columns = ", ".join(f"'x' AS {c}" for c in (*COLUMNS, "record"))
    con = sqlite3.connect(db)
    con.executescript(results_module._SCHEMA.split("CREATE TABLE IF NOT EXISTS rows")[0])
    con.execute("INSERT INTO meta VALUES ('schema', '1')")
    con.execute(f"CREATE VIEW rows AS WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL "
                f"SELECT n + 1 FROM r) SELECT {columns} FROM r ORDER BY n DESC")
    con.commit()
    con.close()


def _view_case(*extra: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        _recursive_view_store(env)
        return _show(env, *(e.replace("TMP", str(env.tmp)) for e in extra))
    return build


def _store_edit(*statements: str, extra: tuple[str, ...] = ()) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        env.copy()
        env.sql(*statements)
        return _show(env, *extra)
    return build


def _store_bytes(make: Callable[[bytes], bytes], *extra: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        env.copy()
        db = env.out / "results.sqlite"
        db.write_bytes(make(db.read_bytes()))
        return _show(env, *extra)
    return build


def _store_is_folder(env: Env) -> list[str]:
    env.copy()
    (env.out / "results.sqlite").unlink()
    (env.out / "results.sqlite").mkdir()
    return _show(env)


def _store_is_fifo(env: Env) -> list[str]:
    env.copy()
    (env.out / "results.sqlite").unlink()
    os.mkfifo(env.out / "results.sqlite")
    return _show(env, "--all")


def _over_read_budget(env: Env) -> list[str]:
    env.copy()
    env.monkeypatch.setenv("NETSHRINK_STUDY_READ_MB", "1")
    env.sql("UPDATE rows SET config = printf('%.*c', 1200000, 'x')")
    return _show(env, "--all")


def _value_too_long(env: Env) -> list[str]:
    env.copy()
    env.sql(f"UPDATE rows SET record = printf('%.*c', {results_module.MAX_VALUE_BYTES + 1},"
            " 'x') WHERE stage = 'prune'")
    return _show(env)


def _user_db_in_record(*extra: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        env.copy()
        mine = env.user_db()
        env.edit_record(lambda r: r.update(db=str(mine)))
        return _show(env, *(e.replace("TMP", str(env.tmp)) for e in extra))
    return build


def _user_db_flag(env: Env) -> list[str]:
    env.copy()
    return _show(env, "--db", str(env.user_db(wal=True)))


def _text_db_in_record(env: Env) -> list[str]:
    env.copy()
    notes = env.user_file()
    env.edit_record(lambda r: r.update(db=str(notes)))
    return _show(env)


def _relative_db_missing(env: Env) -> list[str]:
    env.copy()
    env.edit_record(lambda r: r.update(db="elsewhere/other.sqlite"))
    return _show(env)


def _absolute_db_missing(env: Env) -> list[str]:
    env.copy()
    env.edit_record(lambda r: r.update(db=str(env.tmp / "gone" / "results.sqlite")))
    return _show(env, "--all")


# ------------------------------------------------------------------ damaged study.json

def _record_bytes(data: bytes | Callable[[bytes], bytes], *extra: str,
                  run: bool = False) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        env.copy()
        path = env.out / "study.json"
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)
        args = tuple(e.replace("TMP", str(env.tmp)) for e in extra)
        return _run(env, *args) if run else _show(env, *args)
    return build


def _record_edit(edit: Callable[[dict], Any], *extra: str,
                 run: bool = False) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        env.copy()
        env.edit_record(edit)
        args = tuple(e.replace("TMP", str(env.tmp)) for e in extra)
        return _run(env, *args) if run else _show(env, *args)
    return build


def _huge_record(env: Env) -> list[str]:
    env.copy()
    env.monkeypatch.setenv(STUDY_MB_ENV, "1")  # study.json may then take 2 MB
    env.edit_record(lambda r: r.update(notes=["x" * (3 << 20)]))
    return _show(env)


def _cell(field: str, value: Any) -> Callable[[dict], Any]:
    return lambda r: r["cells"][0].update({field: value})


# ------------------------------------------------------------------ study run

def _db_flag(make: Callable[[Env], Path]) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        return _run(env, "--db", str(make(env)))
    return build


def _our_tables_no_schema_row(env: Env) -> Path:
    env.victim.mkdir()
    path = env.victim / "r.sqlite"
    con = sqlite3.connect(path)
    con.executescript(results_module._SCHEMA)
    con.close()
    return path


def _folder_db(env: Env) -> Path:
    env.user_file()
    return env.victim


def _resume_store(statements: tuple[str, ...] = (), data: bytes | None = None
                  ) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        env.copy()
        if statements:
            env.sql(*statements)
        if data is not None:
            (env.out / "results.sqlite").write_bytes(data)
        return _run(env)
    return build


def _resume_with_view(env: Env) -> list[str]:
    _recursive_view_store(env)
    return _run(env)


def _linked(name: str) -> Callable[[Env], list[str]]:
    """A finished study whose ``name`` (a file or folder) was moved into the user's
    folder and replaced by a symbolic link to it: resuming must not write through it."""
    def build(env: Env) -> list[str]:
        env.copy()
        env.victim.mkdir()
        moved = env.victim / Path(name).name
        os.rename(env.out / name, moved)
        (env.out / name).symlink_to(moved, target_is_directory=moved.is_dir())
        return _run(env)
    return build


def _compress_into_study(env: Env) -> list[str]:
    env.copy()
    weights = env.out / "cells" / "fine-0.5" / "stages" / "01-train" / "model.safetensors"
    return ["compress", "--weights", str(weights), "--data-dir", str(env.fashion),
            "--out", str(env.out)]


def _other_study_folder(env: Env) -> list[str]:
    env.copy()
    return _run(env, study=env.study_file(study_dict(env.fashion, name="other-study")))


def _compress_folder(env: Env) -> list[str]:
    env.copy()
    env.edit_record(lambda r: r.update(spec={"compress": {"target": "size"}, "recipe": {}}))
    return _run(env)


def _run_folder(env: Env) -> list[str]:
    env.out.mkdir()
    (env.out / "run.json").write_text("{}")
    (env.out / "stages").mkdir()
    return _run(env)


def _shared_db_other_folder(env: Env) -> list[str]:
    first = env.copy()
    env.sql(f"INSERT OR REPLACE INTO meta VALUES ('{STUDY_FOLDER_KEY}tiny-study', "
            f"'{first.resolve()}')")
    # a second folder for a study of the same name, on the first one's store
    return ["study", "run", env.study_file(), "--out", str(env.tmp / "second"), "--db",
            str(first / "results.sqlite")]


def _expands_past_bound(env: Env) -> list[str]:
    raw = study_dict(env.fashion)
    raw["recipe"]["stages"] = [dict(TRAIN, name="t${a}${b}${c}"),
                               {"kind": "prune.search", "name": "s",
                                "exclude": [f"layer{i}" for i in range(2000)]}]
    raw["matrix"] = {"a": list(range(10)), "b": list(range(10)), "c": list(range(10))}
    return _run(env, study=env.study_file(raw))


def _stages_not_a_list(env: Env) -> list[str]:
    raw = study_dict(env.fashion)
    raw["recipe"]["stages"] = 5
    return _run(env, study=env.study_file(raw))


def _huge_integer(env: Env) -> list[str]:
    return _run(env, study=env.study_file("name: s\nrecipe: {seed: " + "7" * 5000 + "}\n"
                                          "matrix: {a: [1]}\n"))


def _study_file_bytes(data: bytes) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        path = env.tmp / "s.yaml"
        path.write_bytes(data)
        return _run(env, study=str(path))
    return build


# ------------------------------------------------------------------ --csv

def _csv(target: Callable[[Env], Path]) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        env.copy()
        return _show(env, "--csv", str(target(env)))
    return build


def _under_a_file(env: Env, name: str) -> Path:
    """``name`` in a "folder" that is the user's file: it cannot be made there."""
    (env.tmp / "notes.txt").write_text("the user's")
    return env.tmp / "notes.txt" / name


def _fifo(env: Env) -> Path:
    os.mkfifo(env.tmp / "rows.csv")
    return env.tmp / "rows.csv"


def _db_flag_store_as_csv(env: Env) -> list[str]:
    env.copy()
    elsewhere = env.tmp / "elsewhere.sqlite"
    (env.out / "results.sqlite").rename(elsewhere)
    return _show(env, "--db", str(elsewhere), "--csv", str(elsewhere))


CASES: dict[str, Callable[[Env], list[str]]] = {
    # 1. a store whose `rows` is a view that never ends, triggers, other objects
    "show-recursive-view-as-rows": _view_case(),
    "show-all-recursive-view-as-rows": _view_case("--all"),
    "show-csv-recursive-view-as-rows": _view_case("--csv", "TMP/rows.csv"),
    "show-trigger-in-store": _store_edit(
        "CREATE TRIGGER t AFTER INSERT ON cells BEGIN DELETE FROM rows; END"),
    "show-rows-table-as-view": _store_edit(
        "ALTER TABLE rows RENAME TO rows_real",
        "CREATE VIEW rows AS SELECT * FROM rows_real"),
    "show-extra-table": _store_edit("CREATE TABLE notes (x)"),
    "show-extra-index": _store_edit("CREATE INDEX byk ON rows (kind)"),
    "show-rows-with-other-columns": _store_edit(
        "ALTER TABLE rows ADD COLUMN extra TEXT AS (upper(cell)) VIRTUAL"),
    "show-store-without-rows-table": _store_edit("DROP TABLE rows"),
    "show-store-without-schema-row": _store_edit("DELETE FROM meta WHERE key='schema'"),
    "show-store-of-another-schema": _store_edit("UPDATE meta SET value='9' WHERE key='schema'"),
    # 2. a database study.json (or --db) names that netshrink did not write
    "show-user-db-named-by-study-json": _user_db_in_record(),
    "show-all-user-db-named-by-study-json": _user_db_in_record("--all"),
    "show-csv-user-db-named-by-study-json": _user_db_in_record("--csv", "TMP/rows.csv"),
    "show-user-wal-db-as-db-flag": _user_db_flag,
    "show-text-file-named-by-study-json": _text_db_in_record,
    "show-relative-db-not-in-study-folder": _relative_db_missing,
    "show-db-path-with-nul": _record_edit(lambda r: r.update(db="/tmp/a\x00b")),
    "show-db-path-too-long-for-a-file": _record_edit(lambda r: r.update(db="a/" * 1500 + "b")),
    "show-all-db-path-longer-than-any": _record_edit(lambda r: r.update(db="/" + "a" * 5000),
                                                     "--all"),
    "show-absolute-db-missing": _absolute_db_missing,
    # 3. study run --db on a file that is not a netshrink store
    "run-db-user-sqlite": _db_flag(lambda env: env.user_db()),
    "run-db-user-wal-sqlite": _db_flag(lambda env: env.user_db(wal=True)),
    "run-db-text-file": _db_flag(lambda env: env.user_file()),
    "run-db-our-tables-without-schema-row": _db_flag(_our_tables_no_schema_row),
    "run-db-folder": _db_flag(_folder_db),
    # (a missing folder is made: test_csv_and_db_folders_are_made; a file cannot be one)
    "run-db-folder-is-a-file": _db_flag(lambda env: _under_a_file(env, "r.sqlite")),
    # 4. damaged results.sqlite and study.json, for show, show --all/--csv and run
    "show-store-garbage-bytes": _store_bytes(lambda b: os.urandom(len(b))),
    "show-all-store-truncated": _store_bytes(lambda b: b[: len(b) // 2], "--all"),
    "show-store-header-only": _store_bytes(lambda b: b[:100]),
    "show-store-pages-zeroed": _store_bytes(lambda b: b[:4096] + bytes(len(b) - 4096)),
    "show-store-is-folder": _store_is_folder,
    "show-all-store-is-fifo": _store_is_fifo,
    "show-stage-index-not-a-number": _store_edit("UPDATE rows SET stage_index='x'"),
    "show-all-top1-a-blob": _store_edit("UPDATE rows SET top1=x'00ff'", extra=("--all",)),
    "show-record-not-json": _store_edit("UPDATE rows SET record='{'"),
    "show-record-deep-json": _store_edit(
        "UPDATE rows SET record=printf('%.*c', 100000, '[')"),
    "show-record-wrong-fields": _store_edit("UPDATE rows SET record='{\"index\": \"x\"}'"),
    "show-axes-not-json": _store_edit("UPDATE cells SET axes='[1, 2'"),
    "show-axes-not-labels": _store_edit("UPDATE cells SET axes='{\"a\": [1]}'"),
    "show-all-over-read-budget": _over_read_budget,
    "show-value-too-long": _value_too_long,
    "show-study-json-garbage": _record_bytes(os.urandom(3000)),
    "show-all-study-json-truncated": _record_bytes(lambda b: b[: len(b) // 2], "--all"),
    "show-csv-study-json-deep": _record_bytes(b"[" * 200_000 + b"]" * 200_000, "--csv",
                                              "TMP/rows.csv"),
    "show-study-json-a-list": _record_bytes(b"[1, 2]"),
    "show-study-json-nan": _record_bytes(b'{"name": "x", "cells": [], "n": NaN}'),
    "show-study-json-not-utf8": _record_bytes(b'{"name": "\xff\xfe", "cells": []}'),
    "show-study-json-no-name": _record_edit(lambda r: r.pop("name")),
    "show-all-study-json-name-a-number": _record_edit(lambda r: r.update(name=5), "--all"),
    "show-study-json-cells-a-string": _record_edit(lambda r: r.update(cells="x")),
    "show-study-json-cell-escapes": _record_edit(_cell("name", "../../victim")),
    "show-study-json-cell-axes-a-list": _record_edit(_cell("axes", [1])),
    "show-study-json-cell-recipe-a-string": _record_edit(_cell("recipe", "x")),
    "show-study-json-budget-a-word": _record_edit(
        lambda r: r.update(report={"accuracy_budget": "two"})),
    "show-study-json-notes-numbers": _record_edit(lambda r: r.update(notes=[1, 2])),
    "show-study-json-huge": _huge_record,
    "run-resume-study-json-garbage": _record_bytes(os.urandom(2000), run=True),
    "run-resume-study-json-deep": _record_bytes(b"{\"a\":" * 100_000, run=True),
    "run-resume-study-json-wrong-types": _record_edit(lambda r: r.update(cells={}), run=True),
    "run-resume-store-garbage": _resume_store(data=os.urandom(8192)),
    "run-resume-store-with-trigger": _resume_store((
        "CREATE TRIGGER t AFTER INSERT ON cells BEGIN DELETE FROM rows; END",)),
    "run-resume-store-recursive-view": _resume_with_view,
    "run-study-file-garbage": _study_file_bytes(os.urandom(500)),
    "run-study-file-stages-not-a-list": _stages_not_a_list,
    "run-study-file-huge-integer": _huge_integer,
    # 5. a study within every documented bound whose cells expand past memory
    "run-study-expands-past-the-bound": _expands_past_bound,
    # 6. --workers
    "run-workers-zero": lambda env: _run(env, "--workers", "0"),
    "run-workers-negative": lambda env: _run(env, "--workers", "-3"),
    "run-workers-absurd": lambda env: _run(env, "--workers", "1000000000"),
    "run-workers-absurd-on-ray": lambda env: _run(env, "--workers", str(10**7),
                                                  "--executor", "ray"),
    # 7. --csv targets
    "csv-a-folder": _csv(lambda env: env.user_file().parent),
    "csv-the-store": _csv(lambda env: env.out / "results.sqlite"),
    "csv-the-store-wal": _csv(lambda env: env.out / "results.sqlite-wal"),
    "csv-the-study-json": _csv(lambda env: env.out / "study.json"),
    "csv-the-report": _csv(lambda env: env.out / "report.md"),
    "csv-inside-cells": _csv(lambda env: env.out / "cells" / "fine-0.5" / "run.json"),
    "csv-a-user-file": _csv(lambda env: env.user_file("name,value\n1,2\n")),
    "csv-a-named-pipe": _csv(_fifo),
    "csv-folder-is-a-file": _csv(lambda env: _under_a_file(env, "rows.csv")),
    "csv-the-db-flag-store": _db_flag_store_as_csv,
    # 8. --out on another study's, a compress search's or a run's folder
    "run-out-another-study": _other_study_folder,
    "run-out-compress-folder": _compress_folder,
    "run-out-run-folder": _run_folder,
    # 9. a second study of the same name on a shared store
    "run-shared-db-same-name-other-folder": _shared_db_other_folder,
    # planted symbolic links where a resumed study writes
    "run-resume-report-files-linked": _linked("report_files"),
    "run-resume-cells-linked": _linked("cells"),
    "run-resume-cell-folder-linked": _linked("cells/fine-0.5"),
    "run-resume-store-linked": _linked("results.sqlite"),
    "run-resume-study-json-linked": _linked("study.json"),
    # and compress on a study's folder
    "compress-out-is-a-study-folder": _compress_into_study,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_study_input_is_refused_and_nothing_changes(
    case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, fashion_dir: Path,
    finished: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = Env(tmp_path / "case", fashion_dir, finished, monkeypatch)
    env.tmp.mkdir()
    assert_refused_untouched(CASES[case](env), capsys, tmp_path)


def test_the_table_covers_the_issue() -> None:
    assert len(CASES) >= 80


# ------------------------------------------------------------------ behaviours

def _copy(finished: Path, to: Path) -> Path:
    shutil.copytree(finished, to)
    record = json.loads((to / "study.json").read_text())
    record["db"] = str(to / "results.sqlite")
    (to / "study.json").write_text(json.dumps(record))
    return to


def test_csv_and_db_folders_are_made(finished: Path, fashion_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(finished, tmp_path / "study")
    csv_file = tmp_path / "exports" / "today" / "rows.csv"
    assert main(["study", "show", str(out), "--csv", str(csv_file)]) == 0
    assert csv_file.read_text().startswith(",".join(COLUMNS))
    db = tmp_path / "stores" / "shared" / "r.sqlite"
    study = tmp_path / "s.yaml"
    study.write_text(json.dumps(study_dict(fashion_dir, name="db-folder")))
    assert main(["study", "run", str(study), "--out", str(tmp_path / "s2"), "--db",
                 str(db), "--no-report"]) == 0
    with ResultsStore(db, readonly=True) as store:
        assert [c.status for c in store.cells("db-folder")] == ["done"]


def test_show_leaves_a_real_store_byte_for_byte(finished: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(finished, tmp_path / "study")
    before = snapshot(out)
    csv_file = tmp_path / "rows.csv"
    for extra in ([], ["--all"], ["--csv", str(csv_file)], ["--csv", str(csv_file)]):
        assert main(["study", "show", str(out), *extra]) == 0  # a CSV it wrote: replaced
    shown = capsys.readouterr().out
    assert "fine-0.5/prune" in shown and "wrote 3 rows" in shown
    assert snapshot(out) == before  # no byte changed, no -wal/-shm appeared
    assert csv_file.read_text().startswith(",".join(COLUMNS))


def test_show_sees_what_a_live_writer_committed(finished: Path, tmp_path: Path) -> None:
    from test_study_matrix import _fake_record

    out = _copy(finished, tmp_path / "study")
    with ResultsStore(out / "results.sqlite") as writer:  # open: its rows sit in the -wal
        writer.record_cell("tiny-study", "late", {"method": "x"}, "h", str(out / "cells"),
                           _fake_record("late", 2).stages, 1.0)
        assert (out / "results.sqlite-wal").is_file()
        with ResultsStore(out / "results.sqlite", readonly=True) as reader:
            assert {c.cell for c in reader.cells("tiny-study")} == {"fine-0.5", "late"}
            assert len(reader.rows("tiny-study")) == 3 + 2


def test_a_query_past_its_time_budget_is_stopped(finished: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = _copy(finished, tmp_path / "study")
    monkeypatch.setattr(results_module, "READ_SECONDS", -1.0)  # every deadline has passed
    monkeypatch.setattr(results_module, "_CHECK_EVERY", 1)
    with pytest.raises(UserError, match="took longer than"):
        ResultsStore(out / "results.sqlite", readonly=True)


def test_the_record_names_its_store_absolute_and_old_relative_records_read_sensibly(
        finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = _copy(finished, tmp_path / "runs" / "x")
    study = parse_study(study_dict(Path("/nowhere")))
    write_study_record(Path("runs/x"), study.name, study.cells, Path("runs/x/results.sqlite"),
                       spec={"matrix": {}}, report={})
    record = read_study_record(out)
    assert record["db"] == str(out.resolve() / "results.sqlite")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative record never means the working directory
    (elsewhere / "results.sqlite").write_text("a decoy in the working directory")
    for old in ("runs/x/results.sqlite", "x/results.sqlite", "results.sqlite",
                "./results.sqlite"):
        assert recorded_db(out, {"db": old}) == out / "results.sqlite"
    (out / "sub").mkdir()
    shutil.copy(out / "results.sqlite", out / "sub" / "r.sqlite")
    assert recorded_db(out, {"db": "sub/r.sqlite"}) == out / "sub" / "r.sqlite"
    with pytest.raises(UserError, match=r"'other/results\.sqlite' relative"):
        recorded_db(out, {"db": "other/results.sqlite"})
    assert "of 3 models" in study_content(out, with_plots=False).headline


def test_a_shared_store_gives_a_study_only_its_own_folders_cells(tmp_path: Path) -> None:
    from test_study_matrix import _fake_record

    study = parse_study(study_dict(tmp_path / "no-data"))  # a cell fails in milliseconds
    cell = study.cells[0]
    shared = tmp_path / "shared.sqlite"
    first, second = tmp_path / "first", tmp_path / "second"

    def record(folder: Path) -> None:
        with ResultsStore(shared) as store:
            store.record_cell(study.name, cell.name, cell.axes, cell.recipe_sha256,
                              str(folder / "cells" / cell.name),
                              _fake_record(cell.name, 2).stages, 1.0)
            store.claim(study.name, folder)

    record(first)  # done, with this very recipe, by a folder since moved away
    outcome = run_study(study, second, db=shared, log=lambda _: None, report=False)
    assert outcome.skipped == [] and list(outcome.failed) == [cell.name]  # it ran
    with ResultsStore(shared, readonly=True) as store:
        assert store.study_folder(study.name) == str(second.resolve())
    record(second)
    again = run_study(study, second, db=shared, log=lambda _: None, report=False)
    assert again.skipped == [cell.name] and not again.failed  # its own cell: recorded


def _grid(root: Path, a: int, b: int) -> dict:
    raw = study_dict(root)
    raw["matrix"] = {"ratio": [round(0.05 + 0.9 * i / a, 4) for i in range(a)],
                     "seed": {f"s{j}": {"set": {"seed": j}} for j in range(b)},
                     "method": {"fine": {"stages": [{"kind": "prune.magnitude", "name": "prune",
                                                     "from": "train", "ratio": "${ratio}"}]}}}
    return raw


def test_real_studies_pass_the_expansion_bound_and_it_can_be_raised(
        fashion_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = parse_study(_grid(fashion_dir, 10, 10))  # a real 100-cell study
    assert len(study.cells) == 100
    write_study_record(tmp_path, study.name, study.cells, tmp_path / "r.sqlite",
                       spec=study.spec.model_dump(mode="json"), report={})
    assert len(read_study_record(tmp_path)["cells"]) == 100
    monkeypatch.setenv(STUDY_MB_ENV, "1")
    with pytest.raises(UserError, match=r"raise the bound with \$NETSHRINK_STUDY_MB"):
        parse_study(_grid(fashion_dir, 40, 25))  # 1,000 cells: about 2 MB of recipes
    monkeypatch.setenv(STUDY_MB_ENV, "nonsense")
    with pytest.raises(UserError, match="whole number of megabytes"):
        parse_study(_grid(fashion_dir, 2, 2))
    monkeypatch.setenv(STUDY_MB_ENV, "4")
    assert len(parse_study(_grid(fashion_dir, 40, 25)).cells) == MAX_CELLS


def test_the_workers_bound_follows_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    check_workers(64 * MAX_WORKERS_PER_CORE)
    with pytest.raises(UserError, match="at most 256 on this machine"):
        check_workers(257)
    check_workers(1000, "ray")
    with pytest.raises(UserError, match="give 1 or more"):
        check_workers(True)


# ------------------------------------------------------------------ fuzzing

@pytest.fixture(scope="module")
def valid(finished: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The valid files the fuzzers mutate, and a study folder to put each mutant in."""
    import yaml

    work = tmp_path_factory.mktemp("fuzz")
    out = _copy(finished, work / "study")
    raw = study_dict(Path("/data/fashion"))
    raw["exclude"] = [{"ratio": 0.5, "method": "fine"}]
    raw["matrix"]["ratio"] = [0.5, 0.7]
    return {"out": out, "yaml": yaml.safe_dump(raw).encode(),
            "store": (out / "results.sqlite").read_bytes(),
            "record": (out / "study.json").read_bytes()}


FUZZ_FAST = 25  # examples per reader and mutation in the default run; ``-m slow``: ``SLOW``


def _read_study(out: Path) -> None:
    content = study_content(out, with_plots=False)
    assert content.headline
    with ResultsStore(out / "results.sqlite", readonly=True) as store:
        store.csv_text(read_study_record(out)["name"])


def _paths(value: Any, at: tuple = ()) -> list[tuple]:
    """The place of every node of a JSON value."""
    found = [at]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*at, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*at, i))
    return found


@st.composite
def value_mutated(draw: st.DrawFn, original: Any) -> Any:
    """``original`` (JSON) with one to three nodes replaced by any JSON value, or removed."""
    value = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(value)))
        if not path:
            return draw(json_value)
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_value)
    return value


_SQL_VALUE = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(),
                       st.text(max_size=20), st.binary(max_size=20),
                       json_value.map(lambda v: json.dumps(v, allow_nan=True)))


@st.composite
def store_edits(draw: st.DrawFn) -> list[tuple[str, str, Any]]:
    """One to three ``(table, column, value)``: a column of a row set to any value."""
    columns = {t: [c[0] for c in cols] for t, cols in results_module._expected_columns().items()}
    return [(table, draw(st.sampled_from(columns[table])), draw(_SQL_VALUE))
            for table in draw(st.lists(st.sampled_from(sorted(columns)), min_size=1,
                                       max_size=3))]


def _fuzz_reader(name: str, valid: dict[str, Any], tmp_path: Path, examples: int) -> None:
    """Mutants of one valid file through the reader(s) it goes to; the valid file is put
    back afterwards. ``bytes``: bytes flipped, cut or added; ``values``: JSON (or YAML)
    nodes, or the columns of stored rows, replaced by values of any type."""
    import yaml

    out = valid["out"]
    kind, how = name.split(":")
    if kind == "study yaml":
        path = tmp_path / "s.yaml"

        def check(data: bytes) -> None:
            path.write_bytes(data)
            load_study(path)
        strategy = (mutated(valid["yaml"]) if how == "bytes" else value_mutated(
            yaml.safe_load(valid["yaml"])).map(lambda v: yaml.safe_dump(v).encode()))
        fuzz(name, strategy, check, examples)
        return
    target, original = ((out / "results.sqlite", valid["store"]) if kind == "results.sqlite"
                        else (out / "study.json", valid["record"]))

    def check_file(data: bytes) -> None:
        target.write_bytes(data)
        _read_study(out)

    def check_edits(edits: list[tuple[str, str, Any]]) -> None:
        target.write_bytes(original)
        con = sqlite3.connect(target)
        for table, column, value in edits:
            with contextlib.suppress(sqlite3.IntegrityError):  # NOT NULL, a duplicate key
                con.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = "
                            f"(SELECT min(rowid) FROM {table})", (value,))
        con.commit()
        con.close()
        _read_study(out)

    try:
        if how == "bytes":
            fuzz(name, mutated(original), check_file, examples)
        elif kind == "results.sqlite":
            fuzz(name, store_edits(), check_edits, examples)
        else:
            fuzz(name, value_mutated(json.loads(original)).map(
                lambda v: json.dumps(v, allow_nan=True).encode()), check_file, examples)
    finally:
        target.write_bytes(original)
    assert not (out / "results.sqlite-wal").exists() and not (out / "results.sqlite-shm").exists()


FUZZED = tuple(f"{kind}:{how}" for kind in ("study yaml", "results.sqlite", "study.json")
               for how in ("bytes", "values"))


@pytest.mark.parametrize("name", FUZZED)
def test_fuzz_study_readers(name: str, valid: dict[str, Any], tmp_path: Path) -> None:
    _fuzz_reader(name, valid, tmp_path, FUZZ_FAST)


@pytest.mark.slow
@pytest.mark.parametrize("name", FUZZED)
def test_fuzz_study_readers_slow(name: str, valid: dict[str, Any], tmp_path: Path) -> None:
    _fuzz_reader(name, valid, tmp_path, SLOW)
