"""Run a recipe: baseline, then each stage, each measured, each saved before the next.

Resuming is the normal path, not a special one: every stage has a key (a hash of
everything that decides its output: model section, weights file, data, seed and the
configs of it and all stages before it). On start, finished stages whose key and file
are unchanged are reused; the first changed or unfinished stage and all after it run.
An interrupted training stage resumes from its own saved state.

Each stage takes one of three paths (``Runner.run``): reused from the run folder, copied
from the shared model cache, or executed; all three leave the same kind of record.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import netshrink
from netshrink.data import DataBundle, build_data
from netshrink.heartbeat import heartbeat, marking
from netshrink.models import ModelSpec
from netshrink.models.factory import trusting
from netshrink.recipe.cache import MEASUREMENTS_DIR, CachedStage, ModelCache
from netshrink.recipe.keys import config_files, measure_key, sha, stage_keys
from netshrink.recipe.measuring import StageMeasurer
from netshrink.recipe.run_folder import RunFolder, now
from netshrink.recipe.run_log import RunLog
from netshrink.recipe.schema import Recipe, StageEntry
from netshrink.recipe.slower import note_if_slower
from netshrink.stages.base import STAGES, Deployed, StageContext, checkpoint_meta
from netshrink.stages.record import EpochRecord, RunRecord, StageRecord
from netshrink.stages.start import start_model
from netshrink.store.checkpoint import load_model, save_model
from netshrink.store.layout import MODEL_FILE, stage_path
from netshrink.store.walls import make_dirs, owned_folder, remove_file, remove_tree

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

__all__ = ["Runner", "config_files", "stage_keys"]

_sha = sha  # the name older callers import


def _drop_resumable_state(stage_dir: Path, kind: str) -> None:
    """Once a stage's record is written, what would have resumed it goes: the scratch
    files its kind declares (a training state, an iterative pruning stage's steps)."""
    for pattern in STAGES.get(kind).scratch if kind in STAGES else ():
        for path in stage_dir.glob(pattern):
            if path.is_file() and not path.is_symlink():
                remove_file(path)


@dataclass(frozen=True)
class _Slot:
    """One position of the recipe: the baseline (index 0) or a stage."""

    index: int
    name: str
    kind: str
    key: str
    entry: StageEntry | None  # None for the baseline
    folder: Path

    @property
    def artifact(self) -> Path:
        return self.folder / MODEL_FILE


@dataclass
class _Chain:
    """Where the run stands: its record, and the chain of torch models stages start from."""

    record: RunRecord
    data: DataBundle
    measure_key: str
    baseline: nn.Module
    spec: ModelSpec
    files: dict[str, Path] = field(default_factory=dict)  # stage -> torch model file it left
    last: str = "baseline"  # the latest stage that left a torch model: the default source
    model: nn.Module | None = None
    loaded: Path | None = None  # the file ``model`` (in memory) is a copy of

    def left_model(self, slot: _Slot) -> None:
        """``slot``'s torch model file is the newest in the chain."""
        self.files[slot.name], self.last = slot.artifact, slot.name


class Runner:
    """Runs one recipe into one folder. See the module docstring for resuming."""

    def __init__(
        self,
        recipe: Recipe,
        out: Path,
        *,
        log: Callable[[str], None] = LOG.info,
        progress: bool | None = None,
        cache: ModelCache | None = None,
        reuse_baseline_measurement: bool = False,
        reuse_measurements: bool = False,
        side_by_side: bool = True,
    ) -> None:
        self.recipe = recipe
        wants_reuse = reuse_baseline_measurement or reuse_measurements
        self.reuse = cache.root / MEASUREMENTS_DIR if cache is not None and wants_reuse else None
        self.reuse_all = reuse_measurements
        self.out = out
        self.run_log = RunLog(out, log)
        self.log = marking(self.run_log)
        self.progress = progress
        self.cache = cache
        self.folder = RunFolder(out, recipe, self.log)
        self.side_by_side = side_by_side

    def run(self) -> RunRecord:
        """Run (or resume) the recipe; returns the final run record.

        Raises:
            UserError: bad data, weights or recipe values (found before anything is
                written), or a training that diverged.
        """
        # Every write and removal under the run folder and the cache is checked for
        # planted links (netshrink.store.walls).
        with contextlib.ExitStack() as walls:
            walls.enter_context(owned_folder(self.out, "run"))
            if self.cache is not None:
                walls.enter_context(owned_folder(self.cache.root, "model cache"))
            walls.enter_context(trusting(self.recipe.trusted()))
            # Between the steps that beat with their own names: reading the data, checks.
            walls.enter_context(heartbeat(f"run {self.recipe.name}", self.log))
            walls.callback(self.run_log.close)
            return self._run()

    def _run(self) -> RunRecord:
        entries = self.recipe.parsed_stages()
        chain, previous, keys = self._prepare(entries)
        done = self._finished_by_key(previous)
        old_keys = {s.name: s.key for s in previous.stages} if previous else {}
        for slot in self._slots(entries, keys):
            prior = self._take_finished(done, slot)
            if prior is not None:
                self._reuse(chain, slot, prior)
                continue
            if (slot.folder.exists() and old_keys.get(slot.name, slot.key) != slot.key
                    and slot.folder.name in chain.record.folders):
                # A finished stage of an older config; a folder without a record holds the
                # resumable state of an interrupted stage (its own key guards it), kept.
                remove_tree(slot.folder)
            if not self._from_cache(chain, slot):
                self._execute(chain, slot)
        self.folder.remove_dropped(chain.record)
        self._time_side_by_side(chain.record)
        return chain.record

    def _time_side_by_side(self, record: RunRecord) -> None:
        """Every stage's file timed again side by side (``recipe.side_by_side``), kept
        in the record: the timings the report's ratios come from."""
        from netshrink.recipe.side_by_side import time_side_by_side

        cfg = self.recipe.measure
        if not (self.side_by_side and cfg.latency):
            return
        with heartbeat("side by side", self.log):  # opening a runtime, one slow file
            record.side_by_side = time_side_by_side(
                record, self.out, threads=cfg.threads or torch.get_num_threads(),
                batch=cfg.batch_size, log=self.log)
        if record.side_by_side is not None:
            self.folder.write(record)

    # ------------------------------------------------------------------ before any stage

    def _prepare(self, entries: list[StageEntry]
                 ) -> tuple[_Chain, RunRecord | None, list[str]]:
        """Check everything that can fail on bad input, then (and only then) touch the
        folder; the chain starts at the baseline model."""
        recipe = self.recipe
        previous = self.folder.load_previous()
        if self.cache is not None:
            self.cache.refuse_planted_links()
        data = build_data(recipe.data)
        keys = stage_keys(recipe, entries, data.fingerprint)
        baseline, spec = start_model(recipe.model, data, seed=recipe.seed)  # bad weights: here
        self.folder.preflight(data, entries, baseline)
        make_dirs(self.out)
        self.run_log.open()
        if previous is not None:
            self.folder.clear_interrupted_writes(previous)
        raw_recipe = recipe.model_dump(mode="json")
        record = RunRecord(
            name=recipe.name, recipe=raw_recipe, recipe_sha256=sha(raw_recipe),
            netshrink_version=netshrink.__version__,
            created=previous.created if previous else now(), updated=now(),
            folders=self.folder.owned_folders(previous),
        )
        self.measurer = StageMeasurer(recipe, self.out, data, reuse=self.reuse,
                                      reuse_all=self.reuse_all)
        chain = _Chain(record=record, data=data, measure_key=measure_key(recipe),
                       baseline=baseline, spec=spec)
        return chain, previous, keys

    def _slots(self, entries: list[StageEntry], keys: list[str]) -> list[_Slot]:
        names = ["baseline"] + [e.name for e in entries]
        kinds = ["baseline"] + [e.kind for e in entries]
        return [_Slot(index, name, kind, key, entries[index - 1] if index else None,
                      stage_path(self.out, index, name))
                for index, (name, kind, key) in enumerate(zip(names, kinds, keys, strict=True))]

    def _finished_by_key(self, previous: RunRecord | None) -> dict[str, list[StageRecord]]:
        """Finished stages by key, not by position: a stage removed from or added to the
        recipe shifts the others without invalidating them."""
        done: dict[str, list[StageRecord]] = {}
        for prior in previous.stages if previous else []:
            if prior.status == "done" and prior.artifact and (self.out / prior.artifact).exists():
                done.setdefault(prior.key, []).append(prior)
        return done

    @staticmethod
    def _take_finished(done: dict[str, list[StageRecord]], slot: _Slot) -> StageRecord | None:
        """The finished stage with ``slot``'s key (the one of the same name first)."""
        found = done.get(slot.key) or []
        prior = next((p for p in found if p.name == slot.name), found[0] if found else None)
        if prior is not None:
            found.remove(prior)
        return prior

    # ------------------------------------------------------------------ the three paths

    def _reuse(self, chain: _Chain, slot: _Slot, prior: StageRecord) -> None:
        """A stage that finished before: moved to its position, measured again only if
        the measure settings changed."""
        self.folder.move(chain.record, prior, slot.index, slot.folder)
        if prior.measure_key != chain.measure_key:
            self.log(f"[{slot.index}] {slot.name}: finished before; measuring again")
            with heartbeat(f"[{slot.index}] {slot.name}: measuring", self.log):
                prior.measurement = self.measurer.remeasure(prior)
                prior.cpu_measurement = self.measurer.remeasure_cpu(prior)
            prior.measure_key = chain.measure_key
        else:
            self.log(f"[{slot.index}] {slot.name}: finished before, reused")
        if slot.artifact.is_file():
            chain.left_model(slot)
        chain.record.stages.append(prior)
        self.folder.write(chain.record)

    def _from_cache(self, chain: _Chain, slot: _Slot) -> bool:
        """Copy the stage's model from the shared cache and measure it here; False when
        the cache has no sound entry for its key."""
        cached = self.cache.get(slot.key) if self.cache is not None and slot.entry else None
        if cached is None:
            return False
        self.folder.claim(chain.record, slot.folder)
        if not cached.copy_to(slot.artifact):
            return False
        t0 = time.perf_counter()
        _drop_resumable_state(slot.folder, slot.kind)
        chain.model, chain.spec, _ = load_model(slot.artifact)
        chain.loaded = slot.artifact
        chain.left_model(slot)
        self.log(f"[{slot.index}] {slot.name}: model from the cache; {self._measuring()}")
        with heartbeat(f"[{slot.index}] {slot.name}: measuring", self.log):
            stage = self._cache_record(cached, chain, slot, t0)
        chain.record.stages.append(stage)
        self.folder.write(chain.record)
        acc = stage.measurement.accuracy if stage.measurement else None
        self.log(f"[{slot.index}] {slot.name}: model taken from the cache "
                 f"({cached.folder}), not recomputed"
                 + (f"; top-1 {acc.top1:.4f}" if acc is not None else ""))
        return True

    def _execute(self, chain: _Chain, slot: _Slot) -> None:
        """Run the stage on the model its source left, save and measure what it made."""
        recipe, entry = self.recipe, slot.entry
        source = (entry.source or chain.last) if entry is not None else None
        if source is not None and (chain.model is None or chain.loaded != chain.files[source]):
            chain.model, chain.spec, _ = load_model(chain.files[source])
        self.folder.claim(chain.record, slot.folder)
        started, t0 = now(), time.perf_counter()
        ctx = StageContext(data=chain.data, spec=chain.spec, device=recipe.device,
                           seed=recipe.seed, run_dir=self.out, stage_dir=slot.folder,
                           key=slot.key, log=self.log, progress=self.progress,
                           meta=self._meta(chain.data, slot.name),
                           data_config=recipe.data.model_dump(mode="json"))
        self.log(f"[{slot.index}] {slot.name} ({slot.kind}): running")
        if entry is None:
            result: nn.Module | Deployed = chain.baseline
        else:
            torch.manual_seed(recipe.seed + slot.index)
            # Training shows its own progress; exporting, NNCF or a pruning scan may not.
            with heartbeat(f"[{slot.index}] {slot.name}", self.log):
                result = STAGES.get(slot.kind).fn(chain.model, entry.config, ctx)  # type: ignore[arg-type]
        seconds = time.perf_counter() - t0
        chain.spec = ctx.spec  # a stage that changes the structure (channel pruning) says so
        t1 = time.perf_counter()
        fresh = entry is None and self.measurer.untrained_start()
        self.log(f"[{slot.index}] {slot.name}: ran in {seconds:.0f}s; "
                 + ("counting parameters and MACs (a fresh model)" if fresh
                    else self._measuring()))
        with heartbeat(f"[{slot.index}] {slot.name}: measuring", self.log):
            stage = self._save_and_measure(chain, slot, ctx, result)
        note_if_slower(stage, chain.record.stages, source, self.log)
        stage.seconds, stage.started = seconds, started
        stage.measure_seconds, stage.finished = time.perf_counter() - t1, now()
        chain.record.stages.append(stage)
        self.folder.write(chain.record)
        _drop_resumable_state(slot.folder, slot.kind)
        # Only a stage whose result is its torch model is cached: a deployed file (an INT8
        # ONNX, a packed k-means file) is what such a stage is measured as, and a cache hit
        # measures the torch model.
        if entry is not None and stage.artifact == str(slot.artifact.relative_to(self.out)):
            self._file_in_cache(slot, stage)
        acc = stage.measurement.accuracy if stage.measurement else None
        top1 = f"top-1 {acc.top1:.4f} " if acc is not None else ""
        self.log(f"[{slot.index}] {slot.name}: done in {seconds:.0f}s; {top1}"
                 f"({stage.measure_seconds:.0f}s measuring)")

    # ------------------------------------------------------------------ the parts

    def _measuring(self) -> str:
        """What measuring a stage is about to do, for the log (it can take a while)."""
        m = self.recipe.measure
        what = [f"top-1 on the {m.split} split"]
        if m.latency:
            what.append(f"latency at batch 1 and {m.batch_size}")
        return "measuring: " + ", ".join(what)

    def _meta(self, data: DataBundle, stage: str) -> dict:
        """What a model file of ``stage`` carries for ``eval``/``predict`` on its own."""
        cut = self.recipe.data
        return checkpoint_meta(data, run=self.recipe.name, stage=stage, split={
            "val_size": len(data.val) if data.val is not None else 0,
            "seed": cut.seed, "train_limit": cut.train_limit, "augment": cut.augment,
            # the test images it was measured on (eval measures the same by default)
            "test_limit": cut.test_limit})

    def _save_and_measure(self, chain: _Chain, slot: _Slot, ctx: StageContext,
                          result: nn.Module | Deployed) -> StageRecord:
        """Save the stage's torch model (if it left one) and measure what it made: the
        deployed file in its runtime, or the torch model. Returns the record (times unset)."""
        measurer, cpu_measurement = self.measurer, None
        if isinstance(result, Deployed):
            assert result.file is not None  # a recipe's model has a spec: its files exist
            model = result.model
            if model is not None:
                save_model(model, chain.spec, slot.artifact, meta=ctx.meta)
            measured_file = result.file
            measurement = measurer.saved_file(result.file, result.runtime, result.stats,
                                              result.precision, result.sizes, result.options)
        else:
            model = result
            save_model(model, chain.spec, slot.artifact, meta=ctx.meta)
            measured_file = slot.artifact
            untrained = slot.entry is None and measurer.untrained_start()
            if untrained:
                ctx.notes.append("a fresh, untrained model: parameters, MACs and size "
                                 "recorded; accuracy and speed are measured once trained")
            if untrained:
                measurement = measurer.model(model, slot.artifact, counts_only=True)
            elif slot.index == 0:
                measurement = measurer.baseline(model, slot.artifact, ctx.notes)
            else:
                measurement = measurer.torch_stage(model, slot.artifact, ctx.notes)
            if not untrained:
                cpu_measurement = measurer.cpu_timing(model, slot.artifact)
        # The stage changed its input in place, or left it as the next stage's input.
        chain.model = model
        chain.loaded = slot.artifact if model is not None else None
        if model is not None:
            chain.left_model(slot)
        return StageRecord(
            index=slot.index, name=slot.name, kind=slot.kind, key=slot.key,
            measure_key=chain.measure_key,
            config=slot.entry.config.model_dump(mode="json") if slot.entry else {},
            artifact=str(measured_file.relative_to(self.out)),
            measurement=measurement, cpu_measurement=cpu_measurement,
            history=ctx.history, started=now(), notes=ctx.notes,
        )

    def _file_in_cache(self, slot: _Slot, stage: StageRecord) -> None:
        if self.cache is None:
            return
        self.cache.put(slot.key, slot.artifact, skip=STAGES.get(slot.kind).scratch, info={
            "run": self.recipe.name, "stage": slot.name, "kind": slot.kind,
            "seconds": stage.seconds,
            "history": [h.model_dump(mode="json") for h in stage.history],
            "notes": stage.notes, "created": now()})

    def _cache_record(self, cached: CachedStage, chain: _Chain, slot: _Slot, t0: float
                      ) -> StageRecord:
        """The record of a stage whose model came from the cache: measured here, its
        training history and notes as the run that made it recorded them."""
        assert slot.entry is not None and chain.model is not None
        info = cached.info
        made = (f"model from the cache: made by run {info.get('run')!r}, stage "
                f"{info.get('stage')!r} in {float(info.get('seconds', 0)):.0f} s; "
                "not recomputed")
        notes = [*info.get("notes", []), made]
        stage = StageRecord(
            index=slot.index, name=slot.name, kind=slot.kind, key=slot.key,
            measure_key=chain.measure_key, config=slot.entry.config.model_dump(mode="json"),
            artifact=str(slot.artifact.relative_to(self.out)),
            measurement=self.measurer.torch_stage(chain.model, slot.artifact, notes),
            history=[EpochRecord.model_validate(h) for h in info.get("history", [])],
            started=now(), notes=notes,
        )
        stage.cpu_measurement = self.measurer.cpu_timing(chain.model, slot.artifact)
        stage.seconds, stage.finished = time.perf_counter() - t0, now()
        return stage
