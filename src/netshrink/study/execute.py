"""Running a study: each cell a recipe run in its own folder (``cells/<cell>/``) through
the shared model cache, its measured stages recorded in the results store.

Order: a stage several cells share (the trained model every pruning cell starts from)
is made by the first cell that has it, its *owner*; a cell starts only after the owners
of its shared stages finished, so the others take those stages from the cache instead
of computing them at the same time. With one worker (the default) the cells simply run
in matrix order in this process; with more, in a local process pool, each worker with
its share of the cores.

Resuming: a cell the store records as done with the same recipe is not run again; an
interrupted cell resumes inside its run folder (its finished stages are kept) and its
rows go into the store in one transaction when it finishes, so a killed study loses no
row and duplicates none.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netshrink
from netshrink.errors import UserError
from netshrink.heartbeat import heartbeat
from netshrink.limits import clip
from netshrink.recipe.keys import stage_keys
from netshrink.recipe.run_folder import now
from netshrink.stages.base import STAGES
from netshrink.store.atomic import atomic_write_text
from netshrink.store.layout import check_out_folder, is_within
from netshrink.store.outputs import check_output_folder
from netshrink.store.walls import make_dirs, owned_folder
from netshrink.study.dispatch import Dispatcher, PoolDispatcher, RayDispatcher
from netshrink.study.folder_walls import refuse_study_links
from netshrink.study.report import (
    DB_FILE,
    MAX_HEADLINE_CHARS,
    STUDY_FILE,
    read_study_record,
    render_study_report,
    time_study_side_by_side,
)
from netshrink.study.results import CellStatus, ResultsStore, is_file, store_size
from netshrink.study.schema import STUDY_MB_ENV, Cell, Study, max_study_bytes
from netshrink.study.side_by_side import SIDE_BY_SIDE_FILE

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

CELLS_DIR = "cells"
MAX_WORKERS_PER_CORE = 4  # local workers are processes that each load torch and train
MAX_RAY_WORKERS = 1024  # Ray tasks at once, on a cluster of any size

__all__ = ["CELLS_DIR", "DB_FILE", "StudyOutcome", "check_data_factories", "check_workers",
           "run_cell", "run_study", "write_study_record"]


@dataclass
class StudyOutcome:
    """What one ``run_study`` call did."""

    out: Path
    db: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # recorded as done before
    failed: dict[str, str] = field(default_factory=dict)  # cell -> error
    report: Path | None = None


def _dependencies(cells: tuple[Cell, ...]) -> dict[str, set[str]]:
    """Cell -> the cells that own (make first) a cached stage it also needs."""
    owner: dict[str, str] = {}
    needs: dict[str, set[str]] = {}
    for cell in cells:
        entries = cell.recipe.parsed_stages()
        keys = stage_keys(cell.recipe, entries)[1:]
        needs[cell.name] = set()
        for entry, key in zip(entries, keys, strict=True):
            if not STAGES.get(entry.kind).chains:
                continue  # deployments are not cached: nothing to share
            if key in owner:
                needs[cell.name].add(owner[key])
            else:
                owner[key] = cell.name
    return needs


def write_study_record(out: Path, name: str, cells: list[Cell] | tuple[Cell, ...], db: Path,
                       *, spec: dict[str, Any], report: dict[str, Any],
                       merged: dict[str, list[str]] | None = None,
                       chosen: str | None = None, notes: list[str] | None = None,
                       headline: str | None = None) -> None:
    """``out/study.json``: the cells (with their recipes) the report and ``show`` read;
    ``chosen``: the cell whose final stage the report marks (a compress search's pick);
    ``notes``: lines the report shows first; ``headline``: the line above everything
    else in the report (a compress search's ``compress_headline``), on one line and
    clipped to ``MAX_HEADLINE_CHARS`` characters (what a record may hold)."""
    if headline is not None:
        headline = clip(headline, MAX_HEADLINE_CHARS)
    previous = read_study_record(out) if (out / STUDY_FILE).is_file() else {}
    text = json.dumps({
        "name": name, "netshrink": netshrink.__version__,
        "created": previous.get("created", now()), "updated": now(),
        # absolute: a path relative to the working directory names another store from
        # anywhere else
        "db": str(Path(db).resolve()), "report": report, "spec": spec, "merged": merged or {},
        "chosen": chosen, "notes": notes or [], "headline": headline,
        "cells": [{"name": c.name, "axes": c.axes, "recipe_sha256": c.recipe_sha256,
                   "recipe": c.recipe.model_dump(mode="json")} for c in cells],
    })  # one line: indented, 1,000 cells' recipes would take twice the room
    if len(text) > 2 * max_study_bytes():  # what read_study_record reads back
        raise UserError(f"{out / STUDY_FILE}: the study's record would take {len(text):,} "
                        f"bytes, more than {2 * max_study_bytes():,}; raise the bound with "
                        f"${STUDY_MB_ENV}=MEGABYTES")
    atomic_write_text(out / STUDY_FILE, text)


def check_workers(workers: int, executor: str = "local") -> None:
    """Refuse a number of workers below 1 or beyond what can run at once: locally,
    ``MAX_WORKERS_PER_CORE`` per CPU core (each is a process that loads torch); on Ray,
    ``MAX_RAY_WORKERS``.

    Raises:
        UserError: naming the bound.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers {workers}: give 1 or more")
    if executor == "ray":
        if workers > MAX_RAY_WORKERS:
            raise UserError(f"--workers {workers:,}: at most {MAX_RAY_WORKERS:,} Ray tasks "
                            f"run at once; give 1 to {MAX_RAY_WORKERS:,}")
        return
    cores = os.cpu_count() or 1
    most = MAX_WORKERS_PER_CORE * cores
    if workers > most:
        raise UserError(f"--workers {workers:,}: at most {most:,} on this machine "
                        f"({MAX_WORKERS_PER_CORE} per CPU core, {cores} cores: each worker "
                        f"is a process that loads torch); give 1 to {most:,}, or run on a "
                        "Ray cluster (--executor ray)")


def check_data_factories(cells: list[Cell] | tuple[Cell, ...], workers: int,
                         executor: str = "local") -> None:
    """Before any cell runs: each data factory the cells name imports (here, for local
    workers: they import it the same way), and data held in this process (the loaders
    given to ``netshrink.compress``) is not sent to other processes.

    Raises:
        UserError: a factory that cannot be imported, or in-memory data with workers.
    """
    from netshrink.data.factory import IN_MEMORY_FACTORY, load_factory

    factories = {c.recipe.data.factory for c in cells} - {None}
    if IN_MEMORY_FACTORY in factories and (workers > 1 or executor != "local"):
        raise UserError("DataLoaders given in Python live in this process only: run the "
                        "cells here (one local worker, no Ray), or name a data factory "
                        "(data: {factory: pkg.mod:fn}) that the workers import")
    if executor == "local":
        for factory in sorted(f for f in factories if f and f != IN_MEMORY_FACTORY):
            load_factory(factory)


def check_study_folder(out: Path, name: str, what: str = "study") -> None:
    """``out`` is new, empty, or this same study's (``what`` "study") or a compress
    search's (``what`` "compress") folder: never another study's, the other kind's or a
    run's, whose files it would take over; and it holds no planted symbolic link where
    it writes.

    Raises:
        UserError: naming what the folder holds.
    """
    if not check_out_folder(out, mark=STUDY_FILE, what=what):
        return
    record = read_study_record(out)
    is_study = "matrix" in record["spec"]
    if what == "study" and not is_study:
        raise UserError(f"--out {out}: holds {record['name']!r}, a compress search's folder, "
                        "not a study's; a study writes only into a new or empty folder or "
                        "its own: choose another --out")
    if what == "compress" and is_study:
        raise UserError(f"--out {out}: holds the study {record['name']!r}, not a compress "
                        "search; compress writes only into a new or empty folder or a "
                        "search of its own: choose another --out")
    if what == "study" and record["name"] != name:
        raise UserError(f"--out {out}: holds the study {record['name']!r}, not {name!r}; a "
                        "study writes only into a new or empty folder or its own: choose "
                        "another --out")
    refuse_study_links(out, what)


def _same_folder(recorded: str, folder: Path) -> bool:
    try:
        return Path(recorded).resolve() == folder.resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def _check_store(db: Path, name: str, out: Path, own: bool) -> None:
    """Before anything is written: ``db`` is new, an empty file or a netshrink store, and
    does not hold a study of this name whose cells run in another folder that still
    holds it (two studies of one name would take each other's results).

    Raises:
        UserError: a foreign file, a folder that cannot be made, or the other study's
            folder.
    """
    size = store_size(db)
    if size is None:
        # a missing folder is made once every check has passed (_run_study)
        check_output_folder(db.parent, flag="--db", out=db)
        return
    if size == 0:
        return  # an empty file: a new store
    if own:  # the folder's own store: its cells are this folder's, a copied folder too
        ResultsStore(db, readonly=True).close()
        return
    with ResultsStore(db, readonly=True) as store:
        recorded = store.study_folder(name)
        if recorded is None:  # a store from before folders were recorded
            cells = store.cells(name)
            recorded = str(Path(cells[0].run_folder).parent.parent) if cells else None
    if (recorded is None or _same_folder(recorded, out)
            or not is_file(Path(recorded) / STUDY_FILE)):
        return  # this folder's study, or one whose folder was moved or removed
    raise UserError(f"--db {db}: already holds a study named {name!r} whose cells run in "
                    f"{recorded}; two studies of one name in one store would take each "
                    "other's results: rename this study (its name:) or give another --db")


def _done(cells: list[CellStatus], out: Path, own: bool) -> dict[str, str]:
    """Cell -> recipe hash of the cells recorded as done for this folder: in a shared
    store, only those whose run folder is this study's (a moved study runs again)."""
    return {c.cell: c.recipe_sha256 for c in cells if c.status == "done" and (
        own or _same_folder(c.run_folder, out / CELLS_DIR / c.cell))}


def run_cell(study: str, cell: str, axes: dict[str, str], recipe: dict[str, Any],
             folder: str, db: str, threads: int | None = None,
             log: Callable[[str], None] = LOG.info, progress: bool | None = None) -> float:
    """Run one cell's recipe into ``folder`` and record its rows in ``db``; returns its
    wall time. Top level and plain arguments, so a process pool or a Ray task can call it
    (``netshrink.study.dispatch``, which gives a worker's own ``log`` and ``progress``).
    """
    import torch

    from netshrink.recipe import parse_recipe, run_recipe

    if threads is not None:
        torch.set_num_threads(threads)
    parsed = parse_recipe(recipe, source=f"cell {cell}")
    t0 = time.perf_counter()
    # The study's folder (``OUT/cells/CELL`` is the cell's) is owned here too: a pool or
    # Ray worker does not inherit the caller's walls.
    with owned_folder(Path(folder).parent.parent, "study"):
        record = run_recipe(parsed, Path(folder), report=False, log=log, progress=progress,
                            reuse_measurements=True, side_by_side=False)
        seconds = time.perf_counter() - t0
        with ResultsStore(Path(db)) as store:
            store.record_cell(study, cell, axes, record.recipe_sha256, folder, record.stages,
                              seconds)
    return seconds


def run_study(study: Study, out: Path, *, db: Path | None = None, workers: int = 1,
              executor: str = "local", address: str | None = None,
              log: Callable[[str], None] = LOG.info, report: bool = True) -> StudyOutcome:
    """Run (or resume) every cell of ``study`` into ``out``; render the study report.

    ``executor``: ``local`` (this process with one worker, else a process pool of
    ``workers``) or ``ray`` (``workers`` cells at once as Ray tasks, on the cluster at
    ``address``, or on a local one started here when None). Every worker must see ``out``,
    the results store and the model cache at the same paths (one machine, or a shared
    filesystem).

    Raises:
        UserError: before anything is written: ``out`` is not new, empty or this study's
            folder; ``db`` is not a netshrink store (or new), or holds a study of this
            name run in another folder that still holds it; ``workers`` out of bounds.
    """
    if executor not in ("local", "ray"):
        raise UserError(f"--executor {executor!r}: choose local or ray")
    check_workers(workers, executor)
    check_data_factories(study.cells, workers, executor)
    out = Path(out)
    # Every write and removal under ``out`` is checked for planted links.
    # (the heartbeat: between cells, for the store and the report; cells beat themselves)
    with owned_folder(out, "study"), heartbeat(f"study {study.name}", log):
        return _run_study(study, out, db, workers, executor, address, log, report)


def _run_study(study: Study, out: Path, db: Path | None, workers: int, executor: str,
               address: str | None, log: Callable[[str], None], report: bool
               ) -> StudyOutcome:
    check_study_folder(out, study.name)
    own = db is None or is_within(Path(db).parent, out)
    db = Path(db) if db is not None else out / DB_FILE
    _check_store(db, study.name, out, own)  # all checked: from here on, writes
    make_dirs(out)
    make_dirs(db.parent)  # --db in a folder that is not there yet (checked: it can be)
    outcome = StudyOutcome(out=out, db=db)
    with ResultsStore(db) as store:
        store.claim(study.name, out)
        write_study_record(out, study.name, study.cells, db,
                           spec=study.spec.model_dump(mode="json"),
                           report=study.spec.report.model_dump(mode="json"),
                           merged=study.merged)
        done = _done(store.cells(study.name), out, own)
    todo = [c for c in study.cells if done.get(c.name) != c.recipe_sha256]
    running = {c.name for c in todo}
    outcome.skipped = [c.name for c in study.cells if c.name not in running]
    total = len(study.cells)
    log(f"study {study.name}: {total} cells; {len(outcome.skipped)} recorded before, "
        f"{len(todo)} to run" + (f" on {workers} workers" if workers > 1 else ""))
    if todo and executor == "local" and workers == 1:
        _run_in_process(study, todo, out, db, log, outcome)
    elif todo:
        dispatcher = (PoolDispatcher(workers) if executor == "local"
                      else RayDispatcher(workers, address))
        _run_dispatched(study.name, study.cells, todo, out, db, dispatcher, log, outcome)
    if outcome.ran or not (out / SIDE_BY_SIDE_FILE).exists():
        with heartbeat("study: side by side", log):
            time_study_side_by_side(out, db, log)
    if report:
        outcome.report = render_study_report(out, db)[0]
        log(f"study report: {outcome.report}")
    return outcome


def _progress(outcome: StudyOutcome, total: int, started: float) -> str:
    finished = len(outcome.ran) + len(outcome.failed)
    elapsed = time.perf_counter() - started
    left = total - finished
    eta = f", about {elapsed / finished * left / 60:.0f} min left" if finished and left else ""
    return f"{finished} of {total} cells this call, {elapsed / 60:.1f} min{eta}"


def _run_in_process(study: Study, todo: list[Cell], out: Path, db: Path,
                    log: Callable[[str], None], outcome: StudyOutcome) -> None:
    started = time.perf_counter()
    for k, cell in enumerate(todo, 1):
        log(f"cell {k} of {len(todo)}: {cell.name}")
        try:
            seconds = run_cell(study.name, cell.name, cell.axes,
                               cell.recipe.model_dump(mode="json"),
                               str((out / CELLS_DIR / cell.name).absolute()), str(db.absolute()),
                               log=lambda line, c=cell.name: log(f"  [{c}] {line}"))
        except UserError as exc:
            outcome.failed[cell.name] = str(exc)
            log(f"cell {cell.name}: failed: {exc}")
            continue
        outcome.ran.append(cell.name)
        log(f"cell {cell.name}: done in {seconds:.0f} s; "
            + _progress(outcome, len(todo), started))


def run_cells_dispatched(name: str, cells: tuple[Cell, ...], todo: list[Cell], out: Path,
                         db: Path, dispatcher: Dispatcher, log: Callable[[str], None]
                         ) -> dict[str, str]:
    """Run ``todo`` (of ``cells``, the study ``name``'s) through ``dispatcher``; the cells
    that failed, with why."""
    outcome = StudyOutcome(out=out, db=db)
    _run_dispatched(name, cells, todo, out, db, dispatcher, log, outcome)
    return outcome.failed


def _run_dispatched(study_name: str, cells: tuple[Cell, ...], todo: list[Cell], out: Path,
                    db: Path, dispatcher: Dispatcher, log: Callable[[str], None],
                    outcome: StudyOutcome) -> None:
    """Run ``todo`` through ``dispatcher`` (a process pool, a Ray cluster), at most
    ``dispatcher.slots`` at once, each cell after the owners of its shared stages."""
    needs = _dependencies(cells)
    pending = {c.name: c for c in todo}
    unfinished = set(pending)  # owners that have not finished (or failed) in this call
    started = time.perf_counter()
    running: dict[Any, str] = {}
    try:
        while pending or running:
            ready = [n for n in pending if not (needs[n] & unfinished - {n})]
            if not ready and not running:  # cannot happen: an owner comes before its users
                raise RuntimeError(f"study cells wait on each other: {sorted(pending)}")
            for name in ready[: dispatcher.slots - len(running)]:
                cell = pending.pop(name)
                log(f"cell {cell.name}: starting")
                running[dispatcher.submit(
                    study_name, cell.name, cell.axes, cell.recipe.model_dump(mode="json"),
                    str((out / CELLS_DIR / cell.name).absolute()),
                    str(db.absolute()))] = cell.name
            for handle in dispatcher.wait(list(running)):
                name = running.pop(handle)
                unfinished.discard(name)
                try:
                    seconds = dispatcher.result(handle, name)
                except UserError as exc:
                    outcome.failed[name] = str(exc)
                    log(f"cell {name}: failed: {exc}")
                    continue
                outcome.ran.append(name)
                log(f"cell {name}: done in {seconds:.0f} s; "
                    + _progress(outcome, len(todo), started))
    finally:
        dispatcher.close()
