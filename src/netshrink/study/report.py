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
from typing import Any, NamedTuple

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
from netshrink.study.side_by_side import (
    read_side_by_side,
    side_by_side_p50s,
    steady_p50,
    time_stages_side_by_side,
    write_side_by_side,
)

STUDY_FILE = "study.json"
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
    recorded = set(last) & set(cells)
    for key_rows in by_key.values():
        first = key_rows[0]
        sharing = [cells[r["cell"]]["axes"] for r in key_rows]
        common = [v for a, v in sharing[0].items() if all(s.get(a) == v for s in sharing)]
        if {r["cell"] for r in key_rows} >= recorded and (
                len(recorded) > 1 or first["stage_index"] == 0):
            # every cell's (the input model of a search): by its own name, which the
            # recipe's report.baseline gives, not by an axis value all cells happen to share
            name = first["stage"]
        elif len(key_rows) == 1:
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


class Combined(NamedTuple):
    """A study folder as its report reads it (``read_combined``)."""

    study: dict[str, Any]  # ``read_study_record``
    record: RunRecord  # every distinct stage of the recorded cells once
    rows: list[dict[str, Any]]  # the recorded (done) cells' rows
    done: set[str]  # the recorded cells
    db: Path  # the results store read


def read_combined(out: Path, db: Path | None = None, *, chosen: str | None = None
                  ) -> Combined:
    """The study in ``out`` from its results store (``db``: elsewhere than the record
    names), which is only read; ``chosen``: the cell to name as chosen (a search about
    to record its pick)."""
    study = read_study_record(out)
    if chosen is not None:
        study = {**study, "chosen": chosen}
    db = db or recorded_db(out, study)
    with ResultsStore(db, readonly=True) as store:
        rows = store.rows(study["name"])
        done = {c.cell for c in store.cells(study["name"]) if c.status == "done"}
    rows = [r for r in rows if r["cell"] in done]
    try:
        record = combined_record(study, rows)
    except UserError as exc:
        raise UserError(f"{db}: {exc}") from None
    return Combined(study, record, rows, done, db)


def time_study_side_by_side(out: Path, db: Path, log: Callable[[str], None]) -> None:
    """Time the reference and each cell's final file side by side, round-robin in this
    process, into ``out/side_by_side.json``: every cell was timed right after it was made,
    minutes or hours apart, and the study's headline ratios come from these instead.
    Where they cannot be timed, an older ``side_by_side.json`` is removed."""
    record, rows = read_combined(out, db)[1:3]
    reference = reference_stage(record, list(record.stages))
    timing = None
    if reference is not None:
        timing = time_stages_side_by_side(
            record, out, [reference.stage, *_final_stages(record, rows)], log)
    write_side_by_side(out, timing)


def _size(stage: StageRecord) -> int | None:
    return stage.measurement.smallest_size if stage.measurement is not None else None


def study_headline(record: RunRecord, candidates: list[StageRecord] | None = None,
                   pick: StageRecord | None = None) -> str:
    """The smallest and the fastest model within the accuracy budget of the reference;
    ``candidates``: count and choose among these alone (a compress search's candidates,
    the final stage of each cell, not every stage row), named so, and state the speed of
    ``pick`` (the search's chosen file) instead of the fastest. A speed is told only from
    the files timed side by side at the end of the study or search (``side_by_side``),
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
    speed = (_pick_speed(record, reference.stage, pick) if candidates is not None
             else _fastest(record, reference.stage, within))
    if speed is not None:
        parts.append(speed)
    elif any(_p50(s) for s in within):
        files, end, own = (("the pick and the reference were", "search", "candidate")
                           if candidates is not None else ("the files were", "study", "cell"))
        parts.append(f"speed: not compared ({files} not timed side by side at the end of "
                     f"the {end}, or the timing was noisy; the table has each {own}'s own)")
    return "; ".join(parts) + "."


def _fastest(record: RunRecord, reference: StageRecord, within: list[StageRecord]
             ) -> str | None:
    """The fastest of ``within`` at batch 1 as timed side by side, against the
    reference; a noisy timing gives no figure (the reference's: none at all). None where
    they were not timed so."""
    sbs = record.side_by_side
    if _noisy(sbs, reference):
        return (f"speed: not measured (the side-by-side timing of {reference.name} was "
                "noisy; the notes say why)")
    timed = [s for s in within if steady_p50(sbs, s)]
    ref_ms = steady_p50(sbs, reference)
    if not (timed and ref_ms):
        return None
    fast = min(timed, key=lambda s: steady_p50(sbs, s) or 0.0)
    noisy = sum(_noisy(sbs, s) for s in within)
    return _speed_phrase("fastest at batch 1", fast, reference,
                         ref_ms / (steady_p50(sbs, fast) or 1), "study",
                         f"; {noisy} with a noisy timing left out" if noisy else "")


def _noisy(timing: SideBySide | None, stage: StageRecord) -> bool:
    t = timing.of(stage) if timing is not None else None
    return t is not None and t.latency.noise_reason() is not None


def _pick_speed(record: RunRecord, reference: StageRecord, pick: StageRecord | None
                ) -> str | None:
    """The search's pick at batch 1 against the reference, both timed side by side at
    the end of the search; None where they were not (or not steadily)."""
    p50s = side_by_side_p50s(record.side_by_side, reference, pick) if pick else None
    if pick is None or p50s is None:
        return None
    return _speed_phrase("the pick at batch 1", pick, reference, p50s[0] / p50s[1],
                         "search")


def _speed_phrase(label: str, stage: StageRecord, reference: StageRecord, ratio: float,
                  end: str, extra: str = "") -> str:
    """``stage``'s batch-1 speed ``ratio`` against ``reference``, both runtimes named
    (and "across runtimes" where they differ)."""
    m, ref_m = stage.measurement, reference.measurement
    assert m is not None and m.accuracy is not None and ref_m is not None
    if runtime_family(m) != runtime_family(ref_m):
        speed = (f"{ratio:.2f}x the speed of {reference.name} across runtimes "
                 f"({runtime_name(m)} against {runtime_name(ref_m)})")
    else:
        speed = f"{ratio:.2f}x the speed of {reference.name} (both in {runtime_name(m)})"
    return (f"{label}: {stage.name}, {speed}, {m.accuracy.top1:.2%} top-1 (timed side by "
            f"side at the end of the {end}{extra})")


def study_content(out: Path, db: Path | None = None, *, with_plots: bool = True
                  ) -> ReportContent:
    """The report of the study in ``out`` from its results store (``db``: elsewhere),
    which is only read (see ``ResultsStore``'s ``readonly``); ``with_plots``: draw the
    plots too (the report's; ``study show`` prints tables only)."""
    study, record, rows, done, db = read_combined(out, db)
    unreadable = []
    try:
        record.side_by_side = read_side_by_side(out)
    except UserError as exc:  # a timing file gone bad costs its ratios, not the report
        unreadable.append(f"{exc} (speed not compared from it)")
    content = build_content(record, with_plots=with_plots)
    search = is_compress_record(study)
    candidates = _final_stages(record, rows) if search else None
    pick = final_stage_of(record, rows, study["chosen"]) if search else None
    content = dataclasses.replace(content, headline=study_headline(record, candidates, pick))
    waiting = [c["name"] for c in study["cells"] if c["name"] not in done]
    recorded = len(study["cells"]) - len(waiting)
    what = "Compress search of" if search else "Study of"
    unit = "candidates" if search else "cells"
    status = f"{what} {len(study['cells'])} {unit}; {recorded} recorded in {db}."
    if waiting:
        status += f" Not yet recorded: {', '.join(waiting)}."
    notes = [*study["notes"], status, *unreadable, *content.notes]
    title = (f"netshrink compress: {Path(out).resolve().name}" if search
             else f"netshrink study: {study['name']}")
    return dataclasses.replace(content, title=title, notes=tuple(notes),
                               lead=study.get("headline"))


def is_compress_record(study: dict[str, Any]) -> bool:
    """Whether a record (``read_study_record``) is a compress search's, not a study's."""
    spec = study.get("spec") or {}
    return COMPRESS_SPEC_KEY in spec and "matrix" not in spec


def _last_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each cell's final row (its deployable file, in a compress search)."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["cell"] not in last or row["stage_index"] > last[row["cell"]]["stage_index"]:
            last[row["cell"]] = row
    return last


def _final_stages(record: RunRecord, rows: list[dict[str, Any]]) -> list[StageRecord]:
    """The stages of ``record`` that end a cell (a compress search's candidates: each
    cell's deployable file), once each."""
    keys = {row["stage_key"] for row in _last_rows(rows).values()}
    return [s for s in record.stages if s.key in keys and s.index > 0]


def final_stage_of(record: RunRecord, rows: list[dict[str, Any]], cell: str | None
                   ) -> StageRecord | None:
    """The stage of ``record`` that ends ``cell`` (a search's pick: its chosen file);
    None for no cell, or one not recorded."""
    row = _last_rows(rows).get(cell) if cell else None
    if row is None:
        return None
    return next((s for s in record.stages if s.key == row["stage_key"] and s.index > 0),
                None)


def render_study_report(out: Path, db: Path | None = None) -> tuple[Path, Path]:
    """Write the study's ``report.md`` / ``report.html`` (and plots) into ``out``."""
    return write_report(out, study_content(out, db))
