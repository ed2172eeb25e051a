"""The results store: one SQLite file, one row per measured stage of every study cell.

Why SQLite: the rows are queried (which cells are done, the rows of one study, a CSV),
several studies on one machine (or array tasks on a shared disk) may write to one file at
once, and a killed writer must leave no half row. SQLite in WAL mode gives all three with
nothing to install: readers never block the writer, and each cell's rows go in with one
``BEGIN IMMEDIATE`` transaction (its old rows out, its new rows and its ``done`` mark in),
so a cell is either wholly recorded or not at all, and a re-recorded cell replaces its
rows instead of adding to them. Each row keeps the stage's full config, the hardware and
versions it was measured with, and the seed; ``record`` is the whole stage record (JSON),
so the report rebuilds everything it shows from the store alone.

A store is a file a user may hand us (``--db``, or the one a ``study.json`` names), so
netshrink never writes to a database it did not create, and reads every store as if it
were hostile: opened read-only (``mode=ro``; ``immutable`` when no writer is active, so
not even a ``-wal``/``-shm`` file appears), its schema checked object by object before
the first query (netshrink's three tables with their exact columns; no view, trigger or
other object, which could make a query run for ever or write), every query bounded in
time (a progress handler), in rows and in the bytes it brings into memory, and every
value checked against its column's type.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import sqlite3
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from netshrink.errors import UserError
from netshrink.limits import bounded_json, clip, env_bound
from netshrink.recipe.schema import MAX_RECIPE_STAGES
from netshrink.stages.record import StageRecord
from netshrink.store.atomic import atomic_write_text
from netshrink.store.walls import check_owned_path
from netshrink.study.schema import MAX_CELLS

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0  # a writer waits this long for another's transaction to end
READ_SECONDS = 120.0  # one query; netshrink's own stores answer in well under a second
# rows (or cells) read at once: a study of the most cells, each of the most stages
MAX_ROWS = MAX_CELLS * (MAX_RECIPE_STAGES + 1)
MAX_VALUE_BYTES = 16 << 20  # one stored value (a stage record is a few KB)
ROW_COST = 2048  # bytes one row read costs in memory beyond its text (a dict of 32 values)
READ_MB_ENV = "NETSHRINK_STUDY_READ_MB"  # raises the bytes one read may bring into memory
READ_MB_DEFAULT = 512
_CHECK_EVERY = 10_000  # virtual machine steps between two looks at the clock
STUDY_FOLDER_KEY = "study-folder:"  # meta key prefix: the folder a study's cells run in

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    study TEXT NOT NULL, cell TEXT NOT NULL, axes TEXT NOT NULL,
    recipe_sha256 TEXT NOT NULL, run_folder TEXT NOT NULL, status TEXT NOT NULL,
    seconds REAL, finished TEXT NOT NULL,
    PRIMARY KEY (study, cell));
CREATE TABLE IF NOT EXISTS rows (
    study TEXT NOT NULL, cell TEXT NOT NULL, stage_index INTEGER NOT NULL,
    stage TEXT NOT NULL, kind TEXT NOT NULL, stage_key TEXT NOT NULL, artifact TEXT,
    runtime TEXT, precision TEXT, split TEXT, images INTEGER, top1 REAL, top5 REAL,
    size_bytes INTEGER, params INTEGER, nonzero_params INTEGER, macs INTEGER,
    latency_p50_ms REAL, latency_p90_ms REAL, batch1_images_per_s REAL,
    throughput_batch INTEGER, throughput_images_per_s REAL, noisy INTEGER,
    peak_memory_mb REAL, memory_kind TEXT, stage_seconds REAL,
    config TEXT NOT NULL, hardware TEXT, versions TEXT, seed INTEGER,
    recorded TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (study, cell, stage));
"""

# The columns a CSV export and ``study show`` give, in order (``record`` stays inside).
COLUMNS = (
    "study", "cell", "stage_index", "stage", "kind", "stage_key", "artifact", "runtime",
    "precision", "split", "images", "top1", "top5", "size_bytes", "params",
    "nonzero_params", "macs", "latency_p50_ms", "latency_p90_ms", "batch1_images_per_s",
    "throughput_batch", "throughput_images_per_s", "noisy", "peak_memory_mb",
    "memory_kind", "stage_seconds", "config", "hardware", "versions", "seed", "recorded",
)


@dataclass(frozen=True)
class CellStatus:
    """What the store says of one cell."""

    study: str
    cell: str
    axes: dict[str, str]
    recipe_sha256: str
    run_folder: str
    status: str
    seconds: float | None
    finished: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stage_row(study: str, cell: str, stage: StageRecord, recorded: str) -> dict[str, Any]:
    """The row of one measured stage."""
    m = stage.measurement
    acc = m.accuracy if m is not None else None
    lat = m.latency if m is not None else None
    thr = m.throughput if m is not None else None
    env = m.environment if m is not None else None
    return {
        "study": study, "cell": cell, "stage_index": stage.index, "stage": stage.name,
        "kind": stage.kind, "stage_key": stage.key, "artifact": stage.artifact,
        "runtime": m.runtime if m else None, "precision": m.precision if m else None,
        "split": acc.split if acc else None, "images": acc.images if acc else None,
        "top1": acc.top1 if acc else None, "top5": acc.top5 if acc else None,
        "size_bytes": m.size_bytes if m else None, "params": m.params if m else None,
        "nonzero_params": m.nonzero_params if m else None, "macs": m.macs if m else None,
        "latency_p50_ms": lat.p50_ms if lat else None,
        "latency_p90_ms": lat.p90_ms if lat else None,
        "batch1_images_per_s": lat.images_per_s if lat else None,
        "throughput_batch": thr.batch_size if thr else None,
        "throughput_images_per_s": thr.images_per_s if thr else None,
        "noisy": int(m.noisy) if m else None,
        "peak_memory_mb": m.peak_memory_mb if m else None,
        "memory_kind": m.memory_kind if m else None,
        "stage_seconds": stage.seconds,
        "config": json.dumps(stage.config, sort_keys=True),
        "hardware": json.dumps(env.model_dump(exclude={"versions", "python"})) if env else None,
        "versions": json.dumps(env.versions | {"python": env.python}) if env else None,
        "seed": env.seed if env else None,
        "recorded": recorded, "record": stage.model_dump_json(),
    }


_TABLES = ("meta", "cells", "rows")
# Every object a store netshrink wrote holds: its tables and their primary keys' indexes.
_OBJECTS = {("table", t) for t in _TABLES} | {("index", f"sqlite_autoindex_{t}_1")
                                               for t in _TABLES}
_PY_TYPES: dict[str, tuple[type, ...]] = {"TEXT": (str,), "INTEGER": (int,),
                                          "REAL": (float, int)}


@functools.cache
def _expected_columns() -> dict[str, tuple[tuple[Any, ...], ...]]:
    """Each table's columns as ``PRAGMA table_xinfo`` gives them for netshrink's schema
    (name, type, not null, default, primary key, hidden), from the schema itself."""
    memory = sqlite3.connect(":memory:")
    try:
        memory.executescript(_SCHEMA)
        return {t: tuple(tuple(r[1:]) for r in memory.execute(f"PRAGMA table_xinfo({t})"))
                for t in _TABLES}
    finally:
        memory.close()


def read_budget() -> int:
    """The bytes one read of a store may bring into memory (``$NETSHRINK_STUDY_READ_MB``)."""
    return env_bound(READ_MB_ENV, READ_MB_DEFAULT, most=1 << 30, unit="megabytes") << 20


def _short(value: object) -> str:
    """A value from a hostile file, fit for a one-line message."""
    return clip(repr(value), 60)


def is_file(path: Path) -> bool:
    """``path.is_file()``, False for a path no file can have (too long, a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def store_size(path: Path) -> int | None:
    """The size of the store file at ``path``; None when there is none.

    Raises:
        UserError: a folder or another non-regular file, or one we may not read.
    """
    try:
        st = os.stat(path)
    except ValueError:  # a NUL in the path
        raise UserError(f"{_short(str(path))}: not a path a file can have; give a results "
                        "database (.sqlite) or a new path") from None
    except FileNotFoundError:
        if path.is_symlink():
            raise UserError(f"{path}: a broken symbolic link; give a results database "
                            "(.sqlite) or a new path") from None
        return None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the results database "
                        f"({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise UserError(f"{path}: {kind}; give a results database (.sqlite) or a new path")
    return int(st.st_size)


class ResultsStore:
    """One results database. Use as a context manager, or call ``close``.

    ``readonly``: open an existing store for reading only (``study show``, the report):
    nothing is written, not even a ``-wal``/``-shm`` file. Otherwise the store is created
    when ``path`` is new or an empty file (``create``), and an existing file is checked,
    read-only, to be a store netshrink wrote before anything is written to it.

    Raises:
        UserError: no store there (``readonly`` or not ``create``); a folder; a file that
            is not a netshrink results store (another SQLite database, any other file, a
            store with views, triggers or other tables, or of another schema version).
    """

    def __init__(self, path: Path, *, create: bool = True, readonly: bool = False) -> None:
        self.path = Path(path)
        self._deadline = math.inf
        self._budget = read_budget()
        size = store_size(self.path)
        if size is None and (readonly or not create):
            raise UserError(f"{self.path}: no results database there; give a study's "
                            "--out folder or its results.sqlite")
        self.readonly = readonly
        if readonly:
            self.db = self._connect(readonly=True)
            self._checked(self._check_schema)
            return
        if size:  # an existing file: a store netshrink wrote, checked before any write
            ResultsStore(self.path, readonly=True).close()
        self.db = self._connect(readonly=False)
        self._checked(self._set_up)

    # ------------------------------------------------------------ opening and checks

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        try:
            if readonly:
                wal = Path(f"{self.path}-wal")
                shm = Path(f"{self.path}-shm")
                # A writer at work keeps its newest rows in the -wal file, read through the
                # -shm index; with neither, nothing is being written, and ``immutable``
                # reads the file alone (plain ``mode=ro`` would create both files).
                live = wal.is_file() and shm.is_file()
                if wal.is_file() and wal.stat().st_size and not live:
                    # rows committed into a -wal whose index is gone (a copied folder, a
                    # killed writer): reading the file alone would hide them, and
                    # recovering them writes
                    raise UserError(f"{self.path}: its {wal.name} holds rows without the "
                                    f"{shm.name} index to read them; run the study again "
                                    "(netshrink study run) to fold them into the store, then "
                                    "show it")
                uri = self.path.resolve().as_uri() + "?mode=ro" + ("" if live else "&immutable=1")
                db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S,
                                     isolation_level=None)
            else:
                # SQLite writes through a link on the store (and puts -wal/-shm beside
                # its target): never in a folder netshrink owns
                for path in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                    check_owned_path(path)
                db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise UserError(f"{self.path}: cannot open the results database ({exc}); give "
                            "a results.sqlite a study wrote, or a new path in a folder that "
                            "exists") from None
        db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        db.set_progress_handler(self._too_long, _CHECK_EVERY)
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA trusted_schema=OFF")  # no function a schema names runs
        return db

    def _too_long(self) -> int:
        return 1 if time.monotonic() > self._deadline else 0

    def _checked(self, work: Any, *args: Any) -> Any:
        """``work(*args)`` within the time budget, SQLite's errors as a ``UserError``."""
        self._deadline = time.monotonic() + READ_SECONDS
        try:
            return work(*args)
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                raise UserError(f"{self.path}: reading the results database took longer "
                                f"than {READ_SECONDS:.0f} s and was stopped; a store "
                                "netshrink wrote answers in seconds: this one is damaged "
                                "or not netshrink's") from None
            raise self._damaged(exc) from None
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None
        except UnicodeDecodeError:  # netshrink writes UTF-8 text only
            raise UserError(f"{self.path}: holds text that is not UTF-8; the store is damaged "
                            "or not netshrink's") from None
        finally:
            self._deadline = math.inf

    def _damaged(self, exc: sqlite3.Error) -> UserError:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return UserError(f"{self.path}: the results database stayed locked for "
                             f"{BUSY_TIMEOUT_S:.0f} s by another writer; run again when it "
                             "is done")
        if "too big" in str(exc):
            return UserError(f"{self.path}: holds a value of more than {MAX_VALUE_BYTES:,} "
                             "bytes, which netshrink never writes; the store is damaged or "
                             "not netshrink's")
        why = " ".join(str(exc).split())[:120]  # SQLite may quote the file's own text
        return UserError(f"{self.path}: not a netshrink results database, or a damaged one "
                         f"({why}); give the results.sqlite a study wrote, or a "
                         "new path")

    def _not_ours(self, what: str) -> UserError:
        return UserError(f"{self.path}: not a results database netshrink wrote ({what}); "
                         "netshrink reads and writes only its own stores: give the "
                         "results.sqlite a study wrote, or a new path")

    def _check_schema(self) -> None:
        """Netshrink's three tables with their exact columns and nothing else (a view or
        trigger could make a query run for ever, or write), and its schema version."""
        found = self.db.execute("SELECT type, name, sql FROM sqlite_master LIMIT 64").fetchall()
        for kind, name, sql in found:
            if ((kind, name) not in _OBJECTS
                    or (kind == "table" and not str(sql).startswith("CREATE TABLE "))
                    or (kind == "index" and sql is not None)):
                what = kind if kind in ("table", "index", "view", "trigger") else _short(kind)
                raise self._not_ours(f"it holds the {what} {_short(name)}, which netshrink "
                                     "never makes")
        tables = {name for kind, name, _ in found if kind == "table"}
        if not tables:
            raise self._not_ours("it holds no netshrink table")
        if tables != set(_TABLES):
            missing = ", ".join(t for t in _TABLES if t not in tables)
            raise self._not_ours(f"it has no {missing} table")
        for table, columns in _expected_columns().items():
            got = tuple(tuple(r[1:]) for r in self.db.execute(f"PRAGMA table_xinfo({table})"))
            if got != columns:
                raise self._not_ours(f"its {table} table has other columns than netshrink's")
        found = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if found is None:
            raise self._not_ours("it has no schema record")
        if found[0] != str(SCHEMA_VERSION):
            raise UserError(f"{self.path}: results database of schema {_short(found[0])}, "
                            f"this netshrink reads {SCHEMA_VERSION}; use a new database")

    def _set_up(self) -> None:
        """Create the tables of a new store (one transaction: a killed process leaves an
        empty file or a whole store), then switch it to WAL."""
        with self._transaction():
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    self.db.execute(statement)
            found = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if found is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoint
        self._check_schema()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, taken before reading (``IMMEDIATE``) so two writers
        never both read and then both write."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------ bounded reads

    def _select(self, table: str, where: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        """The rows of ``table`` that match, each value of its column's type; at most
        ``MAX_ROWS`` rows and the read budget in bytes, or a ``UserError``."""
        columns = _expected_columns()[table]
        names = ["rowid", *(c[0] for c in columns)]
        types = {c[0]: (_PY_TYPES[c[1]], bool(c[2]) or bool(c[4])) for c in columns}
        cursor = self.db.execute(f"SELECT {', '.join(names)} FROM {table}{where} LIMIT ?",
                                 (*params, MAX_ROWS + 1))
        found: list[dict[str, Any]] = []
        cost = 0
        for values in cursor:
            if len(found) == MAX_ROWS:
                raise UserError(f"{self.path}: more than {MAX_ROWS:,} {table} in one read, "
                                f"more than a study of {MAX_CELLS:,} cells of "
                                f"{MAX_RECIPE_STAGES + 1} stages has: this store is not one "
                                "netshrink wrote")
            cost += ROW_COST + sum(len(v) for v in values if isinstance(v, str | bytes))
            if cost > self._budget:
                raise UserError(f"{self.path}: the {table} of this study take more than "
                                f"{self._budget >> 20:,} MB; set ${READ_MB_ENV} to read "
                                "more (if the store is really netshrink's)")
            row = dict(zip(names, values, strict=True))
            for name, (kinds, required) in types.items():
                value = row[name]
                if not (isinstance(value, kinds) or (value is None and not required)):
                    raise UserError(f"{self.path}: {table} row {row['rowid']}: {name} holds "
                                    f"{type(value).__name__ if value is not None else 'NULL'}"
                                    f", not {kinds[0].__name__}; the store is damaged or "
                                    "was edited")
            found.append(row)
        return found

    def _cells(self, study: str | None) -> list[CellStatus]:
        rows = self._select("cells", " WHERE study=?" if study is not None else "",
                            (study,) if study is not None else ())
        return [CellStatus(study=r["study"], cell=r["cell"], axes=self._axes(r),
                           recipe_sha256=r["recipe_sha256"], run_folder=r["run_folder"],
                           status=r["status"], seconds=r["seconds"], finished=r["finished"])
                for r in sorted(rows, key=lambda r: r["rowid"])]

    def _axes(self, row: dict[str, Any]) -> dict[str, str]:
        try:
            axes = bounded_json(row["axes"], max_bytes=1 << 20, max_depth=4)
        except ValueError as exc:
            axes = exc
        if not isinstance(axes, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in axes.items()):
            raise UserError(f"{self.path}: cell {_short(row['cell'])}: its axes are not "
                            "the labels netshrink records; the store is damaged or was "
                            "edited")
        return axes

    def _rows(self, study: str | None) -> list[dict[str, Any]]:
        rows = self._select("rows", " WHERE study=?" if study is not None else "",
                            (study,) if study is not None else ())
        for r in rows:
            del r["rowid"]
        return sorted(rows, key=lambda r: (r["study"], r["cell"], r["stage_index"]))

    # ------------------------------------------------------------ the API

    def record_cell(self, study: str, cell: str, axes: dict[str, str], recipe_sha256: str,
                    run_folder: str, stages: Sequence[StageRecord], seconds: float) -> None:
        """Replace ``cell``'s rows with one per measured stage and mark it done, at once."""
        recorded = _now()
        rows = [stage_row(study, cell, s, recorded) for s in stages
                if s.status == "done" and s.measurement is not None]

        def write() -> None:
            with self._transaction():
                self.db.execute("DELETE FROM rows WHERE study=? AND cell=?", (study, cell))
                if rows:
                    names = ", ".join(rows[0])
                    marks = ", ".join("?" * len(rows[0]))
                    self.db.executemany(f"INSERT INTO rows ({names}) VALUES ({marks})",
                                        [tuple(r.values()) for r in rows])
                self.db.execute(
                    "INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, 'done', ?, ?)",
                    (study, cell, json.dumps(axes), recipe_sha256, run_folder, seconds,
                     recorded))

        self._checked(write)

    def cells(self, study: str | None = None) -> list[CellStatus]:
        """The recorded cells (of ``study``), in the order they finished."""
        return self._checked(self._cells, study)

    def rows(self, study: str | None = None) -> list[dict[str, Any]]:
        """Every row (of ``study``), by study, cell and stage."""
        return self._checked(self._rows, study)

    def studies(self) -> list[str]:
        return sorted({c.study for c in self.cells()})

    def study_folder(self, study: str) -> str | None:
        """The folder the store records ``study``'s cells as running in, if any."""
        def read() -> str | None:
            found = self.db.execute("SELECT value FROM meta WHERE key=?",
                                    (STUDY_FOLDER_KEY + study,)).fetchone()
            return found[0] if found is not None and isinstance(found[0], str) else None
        return self._checked(read)

    def claim(self, study: str, folder: Path) -> None:
        """Record ``folder`` (resolved) as the one ``study``'s cells run in."""
        def write() -> None:
            with self._transaction():
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                (STUDY_FOLDER_KEY + study, str(folder.resolve())))
        self._checked(write)

    def csv_text(self, study: str | None = None) -> tuple[str, int]:
        """The rows (of ``study``) as CSV text, and how many."""
        rows = self.rows(study)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return text.getvalue(), len(rows)

    def write_csv(self, path: Path, study: str | None = None) -> int:
        """Write the rows (of ``study``) as CSV, atomically; returns how many."""
        text, count = self.csv_text(study)
        atomic_write_text(path, text)
        return count

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
