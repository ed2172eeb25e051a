"""A study's report, read from the results store alone: every distinct measured model of
every cell in one table (ratios and verdicts against one reference), and the size- and
latency-vs-accuracy Pareto plots over all of them.

A stage that several cells share (the trained model every pruning cell starts from) has
one stage key and is shown once, named by what the cells sharing it have in common
(``train`` when every cell shares it, ``r18/train`` when the cells of the ``r18`` model
do); a cell's own stage is ``cell/stage``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from netshrink.errors import UserError
from netshrink.limits import bounded_json, check_regular, clip, read_regular
from netshrink.recipe.keys import sha
from netshrink.report import ReportContent, build_content, write_report
from netshrink.report.lineage import stage_inputs
from netshrink.report.verdict import (
    accuracy_budget,
    reference_stage,
    runtime_family,
    runtime_name,
)
from netshrink.stages.record import RunRecord, SideBySide, StageRecord
from netshrink.store.layout import check_name
from netshrink.study.results import ResultsStore, is_file
from netshrink.study.schema import STUDY_MB_ENV, StudyReport, max_study_bytes

STUDY_FILE = "study.json"
SIDE_BY_SIDE_FILE = "side_by_side.json"  # the cells' files timed side by side at the end
MAX_SIDE_BY_SIDE_BYTES = 16 << 20  # a few hundred bytes a cell
DB_FILE = "results.sqlite"
MAX_STUDY_JSON_DEPTH = 48  # a recipe nests at most 32 levels, four below the record's top
MAX_HEADLINE_CHARS = 2000  # one sentence of figures; a compress headline takes ~400
COMPRESS_SPEC_KEY = "compress"  # a compress search's record holds its settings under it


class _CellRecord(BaseModel):
    """One cell as ``study.json`` records it."""

    model_config = ConfigDict(extra="ignore")

    name: str
    axes: dict[str, str] = Field(default_factory=dict)
    recipe_sha256: str = ""
    recipe: dict[str, Any] = Field(default_factory=dict)


class _StudyRecord(BaseModel):
    """``study.json`` as netshrink writes it (a compress search writes the same)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    netshrink: str = ""
    created: str = ""
    updated: str = ""
    db: str | None = Field(default=None, max_length=4096, pattern=r"^[^\x00]*$")
    report: StudyReport = Field(default_factory=StudyReport)
    spec: dict[str, Any] = Field(default_factory=dict)
    merged: dict[str, list[str]] = Field(default_factory=dict)
    chosen: str | None = None
    notes: list[str] = Field(default_factory=list)
    # the report's first line when given (a compress search's); None in records before it
    headline: str | None = Field(default=None, max_length=MAX_HEADLINE_CHARS)
    cells: list[_CellRecord]


def _not_a_record(path: Path, why: str) -> UserError:
    return UserError(f"{path}: not a study record netshrink wrote ({why}); give the --out "
                     "folder of a study, or move the damaged study.json away")


def read_study_record(out: Path) -> dict[str, Any]:
    """``out/study.json``: the study as it was last run (name, report, cells), checked
    field by field (a damaged or edited record is a ``UserError``, never a traceback).

    Raises:
        UserError: no record, or not one netshrink wrote.
    """
    path = out / STUDY_FILE
    if not path.is_file():
        raise UserError(f"{out}: no {STUDY_FILE}; give the --out folder of a study")
    limit = 2 * max_study_bytes()  # the cells' recipes, and room for the rest
    size = check_regular(path, STUDY_FILE)
    if size > limit:
        raise UserError(f"{path}: {size:,} bytes, more than the {limit:,} a study record may "
                        f"take; if it is really a study's, raise the bound with "
                        f"${STUDY_MB_ENV}=MEGABYTES (half the record's size)")
    data = read_regular(path, STUDY_FILE, max_bytes=limit)
    try:
        raw = bounded_json(data, max_bytes=limit, max_depth=MAX_STUDY_JSON_DEPTH)
    except ValueError as exc:
        raise _not_a_record(path, str(exc)) from None
    if not isinstance(raw, dict):
        raise _not_a_record(path, "not a JSON object")
    try:
        record = _StudyRecord.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise _not_a_record(path, f"{where[:80]}: {err['msg'][:80]}") from None
    try:
        check_name(record.name, "study name")
        seen = set()
        for cell in record.cells:
            check_name(cell.name, "cell name")
            if cell.name in seen:
                raise UserError(f"cell {cell.name!r} is listed twice")
            seen.add(cell.name)
    except UserError as exc:
        raise _not_a_record(path, str(exc)[:160]) from None
    # Built by hand, not model_dump: the cells' recipes (up to a few MB) stay the objects
    # json.loads made instead of being copied once more.
    return {**{k: getattr(record, k) for k in ("name", "netshrink", "created", "updated",
                                                  "db", "spec", "merged", "chosen", "notes",
                                                  "headline")},
            "report": record.report.model_dump(mode="json"),
            "cells": [{"name": c.name, "axes": c.axes, "recipe_sha256": c.recipe_sha256,
                       "recipe": c.recipe} for c in record.cells]}


def recorded_db(out: Path, study: dict[str, Any]) -> Path:
    """The results store a study record names: absolute as netshrink now records it; an
    older record's relative path is read against the study folder (never the working
    directory, where it may name another study's store).

    Raises:
        UserError: a relative record that names no store there (give ``--db``).
    """
    raw = study.get("db")
    if not raw:
        return out / DB_FILE
    path = Path(raw)
    if path.is_absolute():
        return path
    if is_file(out / path):
        return out / path
    # the default store of a study run as ``--out runs/x``: recorded as runs/x/results.sqlite
    if (path.name == DB_FILE and path.parent.name in ("", out.resolve().name)
            and is_file(out / DB_FILE)):
        return out / DB_FILE
    raise UserError(f"{out / STUDY_FILE}: names its results database {_short(raw)} relative "
                    "to the folder the study was run from, and there is none at that path "
                    "in the study folder; give it with --db PATH")


def _short(value: object) -> str:
    return clip(repr(value), 80)


def _inputs(cell: dict[str, Any]) -> dict[str, str]:
    """Stage -> the stage whose model it started from, in one cell's recipe."""
    probe = RunRecord(name=cell["name"], recipe=cell["recipe"], recipe_sha256="",
                      netshrink_version="", created="", updated="")
    return stage_inputs(probe)


def _stage_record(row: dict[str, Any]) -> StageRecord:
    """The stage record a row keeps (JSON), checked."""
    try:
        return StageRecord.model_validate(bounded_json(row["record"], max_bytes=1 << 24))
    except (ValueError, ValidationError) as exc:
        if isinstance(exc, ValidationError):  # where in the record, and what is wrong
            err = exc.errors()[0]
            first = clip(".".join(str(p) for p in err["loc"]) + f": {err['msg']}", 200)
        else:
            first = str(exc).splitlines()[0][:120]
        raise UserError(f"the row of {_short(row['cell'])}/{_short(row['stage'])} holds no "
                        f"stage record netshrink wrote ({first}); the store is damaged or "
                        "was edited") from None


def combined_record(study: dict[str, Any], rows: list[dict[str, Any]]) -> RunRecord:
    """One run record holding each distinct measured stage of the study's cells once."""
    cells = {c["name"]: c for c in study["cells"]}
    by_key: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["cell"] in cells:
            by_key.setdefault(row["stage_key"], []).append(row)
    last = {}  # cell -> its final stage's index
    for row in rows:
        last[row["cell"]] = max(last.get(row["cell"], 0), row["stage_index"])
    names: dict[tuple[str, str], str] = {}  # (cell, stage) -> shown name
    shown: list[tuple[str, StageRecord, dict[str, Any]]] = []
    for key_rows in by_key.values():
        first = key_rows[0]
        sharing = [cells[r["cell"]]["axes"] for r in key_rows]
        common = [v for a, v in sharing[0].items() if all(s.get(a) == v for s in sharing)]
        if len(key_rows) == 1:
            name = f"{first['cell']}/{first['stage']}"
            if first["cell"] == study.get("chosen") and first["stage_index"] == last[first["cell"]]:
                name += " (chosen)"
        else:
            name = "/".join([*common, first["stage"]]) if common else first["stage"]
        for r in key_rows:
            names[(r["cell"], r["stage"])] = name
        shown.append((name, _stage_record(first), first))
    stages, entries = [], []
    inputs = {cell: _inputs(cells[cell]) for cell in {row["cell"] for _, _, row in shown}}
    for index, (name, stage, row) in enumerate(
            sorted(shown, key=lambda s: (s[1].index > 0, s[2]["cell"], s[1].index))):
        cell = row["cell"]
        artifact = f"cells/{cell}/{stage.artifact}" if stage.artifact else None
        measurement = stage.measurement
        if measurement is not None and measurement.file:
            measurement = measurement.model_copy(
                update={"file": f"cells/{cell}/{measurement.file}"})
        stages.append(stage.model_copy(update={"index": index, "name": name,
                                               "artifact": artifact,
                                               "measurement": measurement}))
        # every stage's start named: the stages of many cells are listed here in no
        # order one could chain them by (a pruning stage's fraction is against its start)
        source = inputs[cell].get(stage.name)
        entry = {"kind": stage.kind, "name": name}
        if (cell, source) in names:
            entry["from"] = names[(cell, source)]
        if index:
            entries.append(entry)
    report = dict(study.get("report") or {})
    return RunRecord(
        name=study["name"], recipe={"report": report, "stages": entries,
                                    "study": study.get("spec", {})},
        recipe_sha256=sha(study.get("spec", {})), netshrink_version=study.get("netshrink", ""),
        created=study.get("created", ""), updated=study.get("updated", ""), stages=stages)


def _p50(stage: StageRecord) -> float | None:
    m = stage.measurement
    return m.latency.p50_ms if m is not None and m.latency is not None else None


def _study_side_by_side(out: Path) -> SideBySide | None:
    """``out/side_by_side.json`` (the reference and each cell's final file timed side by
    side at the end of the study), or None where it was not timed (an older study, timing
    off, an interrupted one)."""
    path = Path(out) / SIDE_BY_SIDE_FILE
    if not is_file(path):
        return None
    what = "side-by-side timing record"
    data = read_regular(path, what, max_bytes=MAX_SIDE_BY_SIDE_BYTES)  # a FIFO, a huge file
    try:
        return SideBySide.model_validate_json(data)
    except ValidationError as exc:
        raise UserError(f"{path}: not a side-by-side timing netshrink wrote "
                        f"({exc.errors()[0]['msg']}); move it away and run the study again "
                        "to time its files again") from None


def time_study_side_by_side(out: Path, db: Path, log: Callable[[str], None]) -> None:
    """Time the reference and each cell's final file side by side, round-robin in this
    process, into ``out/side_by_side.json``: every cell was timed right after it was made,
    minutes or hours apart, and the study's headline ratios come from these instead."""
    from netshrink.recipe.side_by_side import time_side_by_side
    from netshrink.store.atomic import atomic_write_text

    study = read_study_record(out)
    with ResultsStore(db, readonly=True) as store:
        rows = store.rows(study["name"])
        done = {c.cell for c in store.cells(study["name"]) if c.status == "done"}
    rows = [r for r in rows if r["cell"] in done]
    record = combined_record(study, rows)
    reference = reference_stage(record, list(record.stages))
    if reference is None:
        return
    finals = _final_stages(record, rows)
    timed = [s for s in (reference.stage, *finals) if s.measurement is not None
             and s.measurement.latency is not None]
    if len(timed) < 2:
        return
    ref_m = reference.stage.measurement
    assert ref_m is not None and ref_m.latency is not None
    sbs = time_side_by_side(record, Path(out), threads=ref_m.environment.threads,
                            batch=(ref_m.throughput.batch_size if ref_m.throughput else 32),
                            only={s.name for s in timed}, log=log)
    if sbs is not None:
        atomic_write_text(Path(out) / SIDE_BY_SIDE_FILE, sbs.model_dump_json(indent=1))


def _speed_of(stage: StageRecord, sbs: SideBySide | None) -> float | None:
    """``stage``'s batch-1 p50 as timed side by side; None where it was not (or noisy)."""
    t = sbs.of(stage) if sbs is not None else None
    return t.latency.p50_ms if t is not None and t.latency.noise_reason() is None else None


def _noisy_side_by_side(stage: StageRecord, sbs: SideBySide | None) -> bool:
    t = sbs.of(stage) if sbs is not None else None
    return t is not None and t.latency.noise_reason() is not None


def _fastest(within: list[StageRecord], reference: StageRecord, sbs: SideBySide | None
             ) -> str | None:
    """The headline's speed part: the fastest of ``within`` against ``reference`` at batch
    1, from the side-by-side timing only, both runtimes named (and "across runtimes" where
    they differ); a noisy timing gives no figure. None: nothing was timed."""
    ref, ref_m = reference.name, reference.measurement
    assert ref_m is not None
    if _noisy_side_by_side(reference, sbs):
        return (f"speed: not measured (the side-by-side timing of {ref} was noisy; the notes "
                "say why)")
    timed = [s for s in within if _speed_of(s, sbs)]
    ref_ms = _speed_of(reference, sbs)
    if not (timed and ref_ms):
        if not any(_p50(s) for s in within):
            return None
        return ("speed: not compared (the files were not timed side by side at the end of "
                "the study; the table has each cell's own timing)")
    fast = min(timed, key=lambda s: _speed_of(s, sbs) or 0.0)
    m = fast.measurement
    assert m is not None and m.accuracy is not None
    ratio = ref_ms / (_speed_of(fast, sbs) or 1)
    if runtime_family(m) != runtime_family(ref_m):
        speed = (f"{ratio:.2f}x the speed of {ref} across runtimes ({runtime_name(m)} "
                 f"against {runtime_name(ref_m)})")
    else:
        speed = f"{ratio:.2f}x the speed of {ref} (both in {runtime_name(m)})"
    noisy = sum(_noisy_side_by_side(s, sbs) for s in within)
    left_out = f"; {noisy} with a noisy timing left out" if noisy else ""
    return (f"fastest at batch 1: {fast.name}, {speed}, {m.accuracy.top1:.2%} top-1 (timed "
            f"side by side at the end of the study{left_out})")


def _size(stage: StageRecord) -> int | None:
    return stage.measurement.smallest_size if stage.measurement is not None else None


def study_headline(record: RunRecord, candidates: list[StageRecord] | None = None) -> str:
    """The smallest and the fastest model within the accuracy budget of the reference;
    ``candidates``: count and choose among these alone (a compress search's candidates,
    the final stage of each cell, not every stage row), named so. The fastest is told
    only from the files timed side by side at the end of the study (``side_by_side``),
    with both runtimes named."""
    stages = list(record.stages)
    reference = reference_stage(record, stages)
    ref_m = reference.stage.measurement if reference is not None else None
    if reference is None or ref_m is None or ref_m.accuracy is None:
        return "No stage has a measured accuracy yet: nothing to compare."
    budget = accuracy_budget(record)
    floor = ref_m.accuracy.top1 - (budget or 0.0) / 100
    pool = stages if candidates is None else candidates
    within = [s for s in pool if s.measurement is not None and s.measurement.accuracy
              is not None and s.measurement.accuracy.top1 >= floor - 1e-12]
    ref = reference.stage.name
    on = f" on {ref_m.accuracy.split}" if candidates is not None else ""
    scope = (f"Within {budget:g} points of {ref} ({ref_m.accuracy.top1:.2%} top-1{on})"
             if budget is not None else f"At no loss of top-1 against {ref} (no budget set)")
    what = "models" if candidates is None else "candidates"
    parts = [scope + f", {len(within)} of {len(pool)} {what}"]
    sized = [s for s in within if _size(s)]
    if sized and ref_m.size_bytes:
        small = min(sized, key=lambda s: _size(s) or 0)
        m = small.measurement
        assert m is not None and m.accuracy is not None
        packed = " (its packed file)" if _size(small) != m.size_bytes else ""
        parts.append(f"smallest: {small.name}{packed}, "
                     f"{ref_m.size_bytes / (_size(small) or 1):.2f}x smaller "
                     f"({m.accuracy.top1:.2%} top-1)")
    speed = _fastest(within, reference.stage, record.side_by_side)
    if speed:
        parts.append(speed)
    return "; ".join(parts) + "."


def study_content(out: Path, db: Path | None = None, *, with_plots: bool = True
                  ) -> ReportContent:
    """The report of the study in ``out`` from its results store (``db``: elsewhere),
    which is only read (see ``ResultsStore``'s ``readonly``); ``with_plots``: draw the
    plots too (the report's; ``study show`` prints tables only)."""
    study = read_study_record(out)
    db = db or recorded_db(out, study)
    with ResultsStore(db, readonly=True) as store:
        rows = store.rows(study["name"])
        done = {c.cell for c in store.cells(study["name"]) if c.status == "done"}
    rows = [r for r in rows if r["cell"] in done]
    try:
        record = combined_record(study, rows)
    except UserError as exc:
        raise UserError(f"{db}: {exc}") from None
    record.side_by_side = _study_side_by_side(out)
    content = build_content(record, with_plots=with_plots)
    search = is_compress_record(study)
    candidates = _final_stages(record, rows) if search else None
    content = dataclasses.replace(content, headline=study_headline(record, candidates))
    waiting = [c["name"] for c in study["cells"] if c["name"] not in done]
    recorded = len(study["cells"]) - len(waiting)
    what = "Compress search of" if search else "Study of"
    unit = "candidates" if search else "cells"
    status = f"{what} {len(study['cells'])} {unit}; {recorded} recorded in {db}."
    if waiting:
        status += f" Not yet recorded: {', '.join(waiting)}."
    notes = [*study["notes"], status, *content.notes]
    title = (f"netshrink compress: {Path(out).resolve().name}" if search
             else f"netshrink study: {study['name']}")
    return dataclasses.replace(content, title=title, notes=tuple(notes),
                               lead=study.get("headline"))


def is_compress_record(study: dict[str, Any]) -> bool:
    """Whether a record (``read_study_record``) is a compress search's, not a study's."""
    spec = study.get("spec") or {}
    return COMPRESS_SPEC_KEY in spec and "matrix" not in spec


def _final_stages(record: RunRecord, rows: list[dict[str, Any]]) -> list[StageRecord]:
    """The stages of ``record`` that end a cell (a compress search's candidates: each
    cell's deployable file), once each."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["cell"] not in last or row["stage_index"] > last[row["cell"]]["stage_index"]:
            last[row["cell"]] = row
    keys = {row["stage_key"] for row in last.values()}
    return [s for s in record.stages if s.key in keys and s.index > 0]


def render_study_report(out: Path, db: Path | None = None) -> tuple[Path, Path]:
    """Write the study's ``report.md`` / ``report.html`` (and plots) into ``out``."""
    return write_report(out, study_content(out, db))
