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
import json
from pathlib import Path
from typing import Any

from netshrink.errors import UserError
from netshrink.limits import read_regular
from netshrink.recipe.keys import sha
from netshrink.report import ReportContent, build_content, write_report
from netshrink.report.verdict import accuracy_budget, model_origins, reference_stage
from netshrink.stages.record import RunRecord, StageRecord
from netshrink.study.results import ResultsStore

STUDY_FILE = "study.json"
MAX_STUDY_JSON = 16 << 20  # the expanded recipes of at most MAX_CELLS cells


def read_study_record(out: Path) -> dict[str, Any]:
    """``out/study.json``: the study as it was last run (name, report, cells)."""
    path = out / STUDY_FILE
    if not path.is_file():
        raise UserError(f"{out}: no {STUDY_FILE}; give the --out folder of a study")
    try:
        record = json.loads(read_regular(path, STUDY_FILE, max_bytes=MAX_STUDY_JSON))
        if not isinstance(record, dict) or not isinstance(record.get("cells"), list):
            raise ValueError("no cells")
        return record
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a study record netshrink wrote ({exc})") from None


def _origins(cell: dict[str, Any]) -> dict[str, str]:
    """Stage -> the stage whose torch model it holds, in one cell's recipe."""
    probe = RunRecord(name=cell["name"], recipe=cell["recipe"], recipe_sha256="",
                      netshrink_version="", created="", updated="")
    return model_origins(probe)


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
        shown.append((name, StageRecord.model_validate_json(first["record"]), first))
    stages, entries = [], []
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
        source = _origins(cells[cell]).get(stage.name, stage.name)
        entry = {"kind": stage.kind, "name": name}
        if source != stage.name and (cell, source) in names:
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


def _size(stage: StageRecord) -> int | None:
    return stage.measurement.smallest_size if stage.measurement is not None else None


def study_headline(record: RunRecord) -> str:
    """The smallest and the fastest model within the accuracy budget of the reference."""
    stages = list(record.stages)
    reference = reference_stage(record, stages)
    ref_m = reference.stage.measurement if reference is not None else None
    if reference is None or ref_m is None or ref_m.accuracy is None:
        return "No stage has a measured accuracy yet: nothing to compare."
    budget = accuracy_budget(record)
    floor = ref_m.accuracy.top1 - (budget or 0.0) / 100
    within = [s for s in stages if s.measurement is not None and s.measurement.accuracy
              is not None and s.measurement.accuracy.top1 >= floor - 1e-12]
    ref = reference.stage.name
    scope = (f"Within {budget:g} points of {ref} ({ref_m.accuracy.top1:.2%} top-1)"
             if budget is not None else f"At no loss of top-1 against {ref} (no budget set)")
    parts = [scope + f", {len(within)} of {len(stages)} models"]
    sized = [s for s in within if _size(s)]
    if sized and ref_m.size_bytes:
        small = min(sized, key=lambda s: _size(s) or 0)
        m = small.measurement
        assert m is not None and m.accuracy is not None
        packed = " (its packed file)" if _size(small) != m.size_bytes else ""
        parts.append(f"smallest: {small.name}{packed}, "
                     f"{ref_m.size_bytes / (_size(small) or 1):.2f}x smaller "
                     f"({m.accuracy.top1:.2%} top-1)")
    timed = [s for s in within if _p50(s) and s.measurement is not None
             and s.measurement.environment.device == ref_m.environment.device]
    if timed and _p50(reference.stage):
        fast = min(timed, key=lambda s: _p50(s) or 0.0)
        m = fast.measurement
        assert m is not None and m.accuracy is not None
        parts.append(f"fastest at batch 1: {fast.name}, {_p50(reference.stage) / _p50(fast):.2f}x "
                     f"the speed of {ref} ({m.runtime}, {m.accuracy.top1:.2%} top-1)")
    return "; ".join(parts) + "."


def study_content(out: Path, db: Path | None = None) -> ReportContent:
    """The report of the study in ``out`` from its results store (``db``: elsewhere)."""
    study = read_study_record(out)
    db = db or Path(study.get("db") or out / "results.sqlite")
    with ResultsStore(db, create=False) as store:
        rows = store.rows(study["name"])
        done = {c.cell for c in store.cells(study["name"]) if c.status == "done"}
    record = combined_record(study, [r for r in rows if r["cell"] in done])
    content = build_content(record)
    content = dataclasses.replace(content, headline=study_headline(record))
    waiting = [c["name"] for c in study["cells"] if c["name"] not in done]
    recorded = len(study["cells"]) - len(waiting)
    status = f"Study of {len(study['cells'])} cells; {recorded} recorded in {db}."
    if waiting:
        status += f" Not yet recorded: {', '.join(waiting)}."
    extra = [str(n) for n in study.get("notes") or [] if isinstance(n, str)]
    notes = [*extra, status, *content.notes]
    return dataclasses.replace(content, title=f"netshrink study: {study['name']}",
                               notes=tuple(notes))


def render_study_report(out: Path, db: Path | None = None) -> tuple[Path, Path]:
    """Write the study's ``report.md`` / ``report.html`` (and plots) into ``out``."""
    return write_report(out, study_content(out, db))
