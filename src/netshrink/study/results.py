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
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from netshrink.errors import UserError
from netshrink.stages.record import StageRecord
from netshrink.store.atomic import atomic_write_text

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0  # a writer waits this long for another's transaction to end

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


class ResultsStore:
    """One results database (created on first use). Use as a context manager, or call
    ``close``."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(f"{self.path}: no results database there; give a study's "
                            "--out folder or its results.sqlite")
        if self.path.exists() and not self.path.is_file():
            raise UserError(f"{self.path}: not a file; give a results database (.sqlite)")
        try:
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S,
                                      isolation_level=None)  # transactions by hand
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoint
            with self._transaction():
                for statement in _SCHEMA.strip().split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self._check_version()
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: not a netshrink results database ({exc}); give "
                            "the results.sqlite a study wrote, or a new path") from None

    def _check_version(self) -> None:
        found = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if found is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif found[0] != str(SCHEMA_VERSION):
            raise UserError(f"{self.path}: results database of schema {found[0]}, this "
                            f"netshrink reads {SCHEMA_VERSION}; use a new database")

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

    def record_cell(self, study: str, cell: str, axes: dict[str, str], recipe_sha256: str,
                    run_folder: str, stages: Sequence[StageRecord], seconds: float) -> None:
        """Replace ``cell``'s rows with one per measured stage and mark it done, at once."""
        recorded = _now()
        rows = [stage_row(study, cell, s, recorded) for s in stages
                if s.status == "done" and s.measurement is not None]
        with self._transaction():
            self.db.execute("DELETE FROM rows WHERE study=? AND cell=?", (study, cell))
            if rows:
                names = ", ".join(rows[0])
                marks = ", ".join("?" * len(rows[0]))
                self.db.executemany(f"INSERT INTO rows ({names}) VALUES ({marks})",
                                    [tuple(r.values()) for r in rows])
            self.db.execute(
                "INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, 'done', ?, ?)",
                (study, cell, json.dumps(axes), recipe_sha256, run_folder, seconds, recorded))

    def cells(self, study: str | None = None) -> list[CellStatus]:
        """The recorded cells (of ``study``), in the order they finished."""
        query = "SELECT * FROM cells" + (" WHERE study=?" if study else "") + " ORDER BY rowid"
        return [CellStatus(study=r["study"], cell=r["cell"], axes=json.loads(r["axes"]),
                           recipe_sha256=r["recipe_sha256"], run_folder=r["run_folder"],
                           status=r["status"], seconds=r["seconds"], finished=r["finished"])
                for r in self.db.execute(query, (study,) if study else ())]

    def rows(self, study: str | None = None) -> list[dict[str, Any]]:
        """Every row (of ``study``), by study, cell and stage."""
        query = ("SELECT * FROM rows" + (" WHERE study=?" if study else "")
                 + " ORDER BY study, cell, stage_index")
        return [dict(r) for r in self.db.execute(query, (study,) if study else ())]

    def studies(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT study FROM cells ORDER BY 1")]

    def write_csv(self, path: Path, study: str | None = None) -> int:
        """Write the rows (of ``study``) as CSV, atomically; returns how many."""
        rows = self.rows(study)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())
        return len(rows)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
