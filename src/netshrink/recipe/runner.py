"""Run a recipe: baseline, then each stage, each measured, each saved before the next.

Resuming is the normal path, not a special one: every stage has a key (a hash of
everything that decides its output: model section, weights file, data, seed and the
configs of it and all stages before it). On start, finished stages whose key and file
are unchanged are reused; the first changed or unfinished stage and all after it run.
An interrupted training stage resumes from its own saved state.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

import netshrink
from netshrink.bench import MeasureOptions, measure
from netshrink.data import DataBundle, build_data
from netshrink.errors import UserError
from netshrink.recipe.cache import CachedStage, ModelCache, file_sha256
from netshrink.recipe.schema import Recipe, StageEntry, stage_refs
from netshrink.runtime import ModelStats, RuntimeModule, open_runtime
from netshrink.runtime.base import Executable
from netshrink.stages.base import STAGES, Deployed, StageContext, checkpoint_meta
from netshrink.stages.record import EpochRecord, RunRecord, StageRecord
from netshrink.stages.start import start_model
from netshrink.store.atomic import atomic_write_text, is_temp_name
from netshrink.store.checkpoint import load_model, save_model
from netshrink.store.layout import (
    MODEL_FILE,
    RUN_FILE,
    STAGES_DIR,
    check_inputs_outside,
    check_name,
    check_out_folder,
    inside,
    parse_stage_folder,
    stage_path,
)

# A run record is a few kilobytes per stage; a file far beyond that is not one.
MAX_RUN_FILE_BYTES = 64 << 20


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def config_files(value: Any) -> list[Path]:
    """The files a config names (a teacher, a student's weights), anywhere in it."""
    if isinstance(value, Path):
        return [value]
    if isinstance(value, BaseModel):
        value = [getattr(value, name) for name in type(value).model_fields]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in config_files(item)]
    return []


def _file_hashes(value: Any) -> list[str]:
    """Hashes of the files a config names: a changed file must change the key even where
    its path did not."""
    return [file_sha256(path) for path in config_files(value) if path.is_file()]


def stage_keys(recipe: Recipe, entries: list[StageEntry]) -> list[str]:
    """Keys of the baseline and every stage; a key changes when anything upstream does.

    "Upstream" is the chain of torch models a stage starts from (the previous chaining
    stage, or its ``from:``), the stages it reads a teacher from, and the files its
    config names. A stage that does not chain (an export or a quantization, whose file
    the next stage does not get) has a key of its own but is no later stage's upstream,
    so adding, changing or removing one re-runs nothing else.
    """
    weights = recipe.model.weights
    root = {
        "model": recipe.model.model_dump(mode="json"),
        "weights_sha": file_sha256(weights) if weights is not None and weights.is_file() else None,
        "data": recipe.data.model_dump(mode="json", exclude={"batch_size", "num_workers"}),
        "seed": recipe.seed,
    }
    if recipe.device != "cpu":
        # A GPU trains with other kernels and bf16 autocast: not the CPU's model, so not
        # its cache entry or its finished stage. (CPU keys stay as they always were.)
        root["device"] = recipe.device
    keys = [_sha(root)]
    by_name = {"baseline": keys[0]}
    chain = keys[0]
    for entry in entries:
        parent = by_name[entry.source] if entry.source is not None else chain
        refs = [by_name.get(ref, ref) for ref in stage_refs(entry.config)]
        parts = [parent, entry.kind, entry.config.model_dump(mode="json")]
        extra = refs + _file_hashes(entry.config)
        keys.append(_sha([*parts, extra] if extra else parts))
        by_name[entry.name] = keys[-1]
        if STAGES.get(entry.kind).chains:
            chain = keys[-1]
    return keys


def _drop_resumable_state(stage_dir: Path, kind: str) -> None:
    """Once a stage's record is written, what would have resumed it goes: the scratch
    files its kind declares (a training state, an iterative pruning stage's steps)."""
    for pattern in STAGES.get(kind).scratch if kind in STAGES else ():
        for path in stage_dir.glob(pattern):
            if path.is_file() and not path.is_symlink():
                path.unlink()


class Runner:
    """Runs one recipe into one folder. See the module docstring for resuming."""

    def __init__(
        self,
        recipe: Recipe,
        out: Path,
        *,
        log: Callable[[str], None] = print,
        progress: bool | None = None,
        cache: ModelCache | None = None,
    ) -> None:
        self.recipe = recipe
        self.out = out
        self.log = log
        self.progress = progress
        self.cache = cache

    def _cached(self, key: str) -> CachedStage | None:
        return self.cache.get(key) if self.cache is not None else None

    def _cache_record(self, cached: CachedStage, entry: StageEntry, index: int, name: str,
                      key: str, measure_key: str, artifact: Path, measurement: Any, t0: float
                      ) -> StageRecord:
        """The record of a stage whose model came from the cache: measured here, its
        training history and notes as the run that made it recorded them."""
        info = cached.info
        made = (f"model from the cache: made by run {info.get('run')!r}, stage "
                f"{info.get('stage')!r} in {float(info.get('seconds', 0)):.0f} s; "
                "not recomputed")
        return StageRecord(
            index=index, name=name, kind=entry.kind, key=key, measure_key=measure_key,
            config=entry.config.model_dump(mode="json"),
            artifact=str(artifact.relative_to(self.out)), measurement=measurement,
            history=[EpochRecord.model_validate(h) for h in info.get("history", [])],
            seconds=time.perf_counter() - t0, started=_now(), finished=_now(),
            notes=[*info.get("notes", []), made],
        )

    def _load_previous(self) -> RunRecord | None:
        """The run record already in ``out``, its names and paths checked to stay inside
        the folder; None for a new or empty folder.

        Raises:
            UserError: ``out`` is a file or someone else's folder, or its ``run.json`` is
                unreadable or names paths outside it (written by hand, or tampered with).
        """
        if not check_out_folder(self.out):
            return None
        path = self.out / RUN_FILE
        try:
            if path.stat().st_size > MAX_RUN_FILE_BYTES:
                raise UserError(f"{path}: too large to be a run record; move the folder away "
                                "or choose another --out")
            previous = RunRecord.model_validate_json(path.read_bytes())
        except (ValueError, OSError, RecursionError) as exc:
            why = (exc.errors()[0]["msg"] if isinstance(exc, ValidationError)
                   else str(exc).splitlines()[0])
            raise UserError(f"{path}: unreadable run record ({why[:200]}); move the folder "
                            "away or choose another --out") from None
        for stage in previous.stages:
            check_name(stage.name, f"{path}: stage name")
            if stage.artifact is not None:
                inside(self.out, stage.artifact, f"{path}: artifact")
                parts = Path(stage.artifact).parts
                if (len(parts) < 3 or parts[0] != STAGES_DIR
                        or parse_stage_folder(parts[1]) is None):
                    raise UserError(f"{path}: artifact {stage.artifact!r} is not in a stage "
                                    "folder (stages/NN-name/...); move the folder away or "
                                    "choose another --out")
        for folder in previous.folders:
            if parse_stage_folder(folder) is None:
                raise UserError(f"{path}: {folder!r} is not a stage folder name; move the "
                                "folder away or choose another --out")
        return previous

    def _preflight(self, data: DataBundle, entries: list[StageEntry]) -> None:
        """Check what the stages will read, before the run folder is touched: every file a
        stage's config names loads as a model of this dataset's classes, and no input lies
        where the run writes.

        Raises:
            UserError: naming the stage, the file and the fix.
        """
        if self.recipe.data.name == "imagefolder" and self.recipe.data.root is not None:
            # Decoded lazily while training: a bad image in val/ would otherwise surface
            # after an epoch, with stage files already written.
            from netshrink.data.imagefolder import check_image_folder

            n = check_image_folder(self.recipe.data.root)
            self.log(f"checked {n:,} images in {self.recipe.data.root}")
        inputs: list[tuple[str, Path]] = []
        if self.recipe.model.weights is not None:
            inputs.append(("model.weights", self.recipe.model.weights))
        if self.recipe.data.root is not None:
            inputs.append(("data.root", self.recipe.data.root))
        for i, entry in enumerate(entries):
            where = f"stages[{i}] ({entry.name})"
            for path in config_files(entry.config):
                inputs.append((f"{where}: file", path))
                if not path.is_file():
                    raise UserError(f"{where}: {path} not found (or not a regular file); give "
                                    "the path of a model file")
                _, spec, _ = load_model(path)
                if spec.num_classes != data.info.num_classes:
                    raise UserError(
                        f"{where}: {path} predicts {spec.num_classes} classes but "
                        f"{data.info.name} has {data.info.num_classes}; give a model "
                        "trained on this dataset")
        check_inputs_outside(self.out, inputs)

    def _write(self, record: RunRecord) -> None:
        record.updated = _now()
        atomic_write_text(self.out / RUN_FILE, record.model_dump_json(indent=2))

    def _measure(self, model: nn.Module, data: DataBundle, file: Path,
                 sizes: dict[str, int] | None = None, precision: str | None = None,
                 *, counts_only: bool = False) -> Any:
        """Measure ``model`` (saved as ``file``) as the measure section says;
        ``counts_only``: params, MACs and size alone (a fresh, untrained model, whose
        accuracy is chance and whose speed the stage that trains it measures)."""
        m = self.recipe.measure
        split = data.test if m.split == "test" else data.val
        if split is None:
            raise UserError("measure.split is 'val' but data.val_size is 0; set one of them")
        info = data.info
        device = self.recipe.device if not isinstance(model, RuntimeModule) else "cpu"
        options = m.options(device=device, seed=self.recipe.seed,
                            eval_batch_size=self.recipe.data.batch_size)
        if counts_only:
            options = options.model_copy(update={"latency": False, "memory": False})
        return measure(model, input_shape=[info.in_channels, info.image_size, info.image_size],
                       data=None if counts_only else split, split_name=m.split, file=file,
                       run_dir=self.out, sizes=sizes or None, precision=precision,
                       options=options)

    def _cpu_timing(self, model: nn.Module, data: DataBundle, file: Path) -> Any:
        """The torch ``model`` timed on the CPU as well, when ``measure.also_cpu`` asks for
        it in a GPU recipe (speed and memory only: the same weights give the same answers);
        None otherwise."""
        if not self._wants_cpu_timing():
            return None
        m = self.recipe.measure
        info = data.info
        options = MeasureOptions(device="cpu", threads=m.threads, seed=self.recipe.seed,
                                 batch_size=m.batch_size)
        return measure(model, input_shape=[info.in_channels, info.image_size, info.image_size],
                       file=file, run_dir=self.out, options=options)

    def _wants_cpu_timing(self) -> bool:
        m = self.recipe.measure
        return m.also_cpu and m.latency and self.recipe.device != "cpu"

    def _remeasure_cpu(self, prior: StageRecord, data: DataBundle) -> Any:
        """``_cpu_timing`` of a finished stage whose result is a plain torch model file."""
        old = prior.measurement
        if (not self._wants_cpu_timing() or old is None or old.runtime != "torch"
                or old.runtime_options or old.accuracy is None or prior.artifact is None
                or not prior.artifact.endswith(MODEL_FILE)):
            return None
        return self._cpu_timing(load_model(self.out / prior.artifact)[0], data,
                                self.out / prior.artifact)

    def _measure_file(self, data: DataBundle, file: Path, runtime: str, stats: ModelStats,
                      precision: str | None, sizes: dict[str, int] | None,
                      options: dict[str, Any] | None = None) -> Any:
        """Open a saved model in its runtime (prepared as ``options`` say) and measure it."""
        info = data.info
        model = open_runtime(file, runtime, stats=stats, threads=self.recipe.measure.threads,
                             precision=precision, device=self.recipe.device, options=options,
                             input_shape=[info.in_channels, info.image_size, info.image_size])
        try:
            return self._measure(model, data, file, sizes, precision)
        finally:
            if isinstance(model, Executable):
                model.close()  # sessions, compiled graphs and their GPU memory go now

    def _remeasure(self, prior: StageRecord, data: DataBundle) -> Any:
        """Measure a finished stage's file again (the measure section changed)."""
        old = prior.measurement
        assert old is not None and prior.artifact is not None  # a finished stage has both
        # Every file reopens in the runtime it was measured in (torch files too), with the
        # counts it was measured with (a runtime's graph hides them).
        stats = ModelStats(params=old.params, nonzero_params=old.nonzero_params, macs=old.macs)
        if prior.index == 0 and self._untrained_start():
            return self._measure(load_model(self.out / prior.artifact)[0], data,
                                 self.out / prior.artifact, counts_only=True)
        return self._measure_file(data, self.out / prior.artifact, old.runtime, stats,
                                  old.precision, old.sizes, old.runtime_options)

    def _untrained_start(self) -> bool:
        """The baseline is a fresh init that later stages train: not worth evaluating."""
        return self.recipe.model.weights is None and bool(self.recipe.stages)

    def run(self) -> RunRecord:
        """Run (or resume) the recipe; returns the final run record.

        Raises:
            UserError: bad data, weights or recipe values found while running.
        """
        recipe = self.recipe
        entries = recipe.parsed_stages()
        # Everything that can fail on bad input is checked before the folder is touched.
        previous = self._load_previous()
        data = build_data(recipe.data)
        keys = stage_keys(recipe, entries)
        # A bad weights file fails here, before any write.
        baseline, spec = start_model(recipe.model, data, seed=recipe.seed)
        self._preflight(data, entries)
        self.out.mkdir(parents=True, exist_ok=True)
        if previous is not None:
            self._clear_interrupted_writes(previous)
        measured = recipe.measure.model_dump(mode="json")
        if not measured["also_cpu"]:
            del measured["also_cpu"]  # runs from before the option keep their measurements
        measure_key = _sha(measured | (
            {"device": recipe.device} if recipe.device != "cpu" else {}))
        raw_recipe = recipe.model_dump(mode="json")
        record = RunRecord(
            name=recipe.name,
            recipe=raw_recipe,
            recipe_sha256=_sha(raw_recipe),
            netshrink_version=netshrink.__version__,
            created=previous.created if previous else _now(),
            updated=_now(),
            folders=self._owned_folders(previous),
        )
        # Finished stages are found by key, not by position: a stage removed from or added
        # to the recipe shifts the others without invalidating them.
        done: dict[str, list[StageRecord]] = {}
        for prior in previous.stages if previous else []:
            if prior.status == "done" and prior.artifact and (self.out / prior.artifact).exists():
                done.setdefault(prior.key, []).append(prior)
        old_dirs = {s.name: s.key for s in previous.stages} if previous else {}
        names = ["baseline"] + [e.name for e in entries]
        kinds = ["baseline"] + [e.kind for e in entries]
        files: dict[str, Path] = {}  # stage name -> the torch model file it left
        last = "baseline"  # the latest stage that left a torch model: the default source
        model: nn.Module | None = None
        loaded: Path | None = None  # the file ``model`` (in memory) is a copy of
        for index, (name, kind, key) in enumerate(zip(names, kinds, keys, strict=True)):
            stage_dir = stage_path(self.out, index, name)
            artifact = stage_dir / MODEL_FILE
            entry = entries[index - 1] if index > 0 else None
            source = (entry.source or last) if entry is not None else None
            prior = next((p for p in done.get(key, []) if p.name == name),
                         done[key][0] if done.get(key) else None)
            if prior is not None:
                done[key].remove(prior)
                self._move(record, prior, index, stage_dir)
                if prior.measure_key != measure_key:
                    self.log(f"[{index}] {name}: finished before; measuring again")
                    prior.measurement = self._remeasure(prior, data)
                    prior.cpu_measurement = self._remeasure_cpu(prior, data)
                    prior.measure_key = measure_key
                else:
                    self.log(f"[{index}] {name}: finished before, reused")
                if artifact.is_file():
                    files[name], last = artifact, name
                record.stages.append(prior)
                self._write(record)
                continue
            if (stage_dir.exists() and old_dirs.get(name, key) != key
                    and stage_dir.name in record.folders):
                # A finished stage of an older config; a folder without a record holds the
                # resumable state of an interrupted stage (its own key guards it), kept.
                shutil.rmtree(stage_dir)
            cached = self._cached(key) if entry is not None else None
            if cached is not None:
                self._claim(record, stage_dir)
            if cached is not None and cached.copy_to(artifact):
                t0 = time.perf_counter()
                _drop_resumable_state(stage_dir, kind)
                model, spec, _ = load_model(artifact)
                loaded, files[name], last = artifact, artifact, name
                stage = self._cache_record(cached, entry, index, name, key, measure_key,
                                           artifact, self._measure(model, data, artifact), t0)
                stage.cpu_measurement = self._cpu_timing(model, data, artifact)
                record.stages.append(stage)
                self._write(record)
                acc = stage.measurement.accuracy
                self.log(f"[{index}] {name}: model taken from the cache "
                         f"({cached.folder}), not recomputed"
                         + (f"; top-1 {acc.top1:.4f}" if acc is not None else ""))
                continue
            if source is not None and (model is None or loaded != files[source]):
                model, spec, _ = load_model(files[source])
            self._claim(record, stage_dir)
            started, t0 = _now(), time.perf_counter()
            meta = checkpoint_meta(data, run=recipe.name, stage=name, split={
                "val_size": len(data.val) if data.val is not None else 0,
                "seed": recipe.data.seed, "train_limit": recipe.data.train_limit})
            ctx = StageContext(data=data, spec=spec, device=recipe.device, seed=recipe.seed,
                               run_dir=self.out, stage_dir=stage_dir, key=key, log=self.log,
                               progress=self.progress, meta=meta)
            self.log(f"[{index}] {name} ({kind}): running")
            if entry is None:
                model = baseline
            else:
                torch.manual_seed(recipe.seed + index)
                model = STAGES.get(kind).fn(model, entry.config, ctx)  # type: ignore[arg-type]
            seconds = time.perf_counter() - t0
            spec = ctx.spec  # a stage that changes the structure (channel pruning) says so
            t1 = time.perf_counter()
            cpu_measurement = None
            if isinstance(model, Deployed):
                deployed = model
                model = deployed.model
                if model is not None:
                    save_model(model, spec, artifact, meta=meta)
                measured_file = deployed.file
                measurement = self._measure_file(data, deployed.file, deployed.runtime,
                                                 deployed.stats, deployed.precision,
                                                 deployed.sizes, deployed.options)
            else:
                save_model(model, spec, artifact, meta=meta)
                measured_file = artifact
                untrained = entry is None and self._untrained_start()
                if untrained:
                    ctx.notes.append("a fresh, untrained model: parameters, MACs and size "
                                     "recorded; accuracy and speed are measured once trained")
                measurement = self._measure(model, data, artifact, counts_only=untrained)
                if not untrained:
                    cpu_measurement = self._cpu_timing(model, data, artifact)
            # The stage changed its input in place, or left it as the next stage's input.
            loaded = artifact if model is not None else None
            if model is not None:
                files[name], last = artifact, name
            stage = StageRecord(
                index=index, name=name, kind=kind, key=key, measure_key=measure_key,
                config=entry.config.model_dump(mode="json") if entry is not None else {},
                artifact=str(measured_file.relative_to(self.out)),
                measurement=measurement, cpu_measurement=cpu_measurement,
                history=ctx.history, seconds=seconds,
                measure_seconds=time.perf_counter() - t1, started=started, finished=_now(),
                notes=ctx.notes,
            )
            record.stages.append(stage)
            self._write(record)
            _drop_resumable_state(stage_dir, kind)
            # Only a stage whose result is its torch model is cached: a deployed file (an
            # INT8 ONNX, a packed k-means file) is what such a stage is measured as, and a
            # cache hit measures the torch model.
            if entry is not None and measured_file == artifact and self.cache is not None:
                self.cache.put(key, artifact, skip=STAGES.get(kind).scratch, info={
                    "run": recipe.name, "stage": name, "kind": kind, "seconds": seconds,
                    "history": [h.model_dump(mode="json") for h in ctx.history],
                    "notes": ctx.notes, "created": _now()})
            acc = measurement.accuracy
            top1 = f"top-1 {acc.top1:.4f} " if acc is not None else ""
            self.log(f"[{index}] {name}: done in {seconds:.0f}s; {top1}"
                     f"({stage.measure_seconds:.0f}s measuring)")
        # Stage folders this run made for stages no longer in the recipe go; anything
        # else in stages/ (the user's own files) is left alone.
        kept = {Path(s.artifact).parts[1] for s in record.stages if s.artifact}
        for name in sorted(set(record.folders) - kept):
            folder = self.out / STAGES_DIR / name
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder)
            record.folders.remove(name)
        self._write(record)
        return record

    def _owned_folders(self, previous: RunRecord | None) -> list[str]:
        """The stage folders netshrink made in ``out``: those its record lists, those its
        stages' files are in, and (runs recorded before the list existed) an interrupted
        stage's folder that has the name this recipe gives that position."""
        if previous is None:
            return []
        owned = set(previous.folders)
        owned |= {Path(s.artifact).parts[1] for s in previous.stages if s.artifact}
        if not previous.folders:
            names = ["baseline"] + [e.name for e in self.recipe.parsed_stages()]
            owned |= {stage_path(self.out, i, n).name for i, n in enumerate(names)
                      if stage_path(self.out, i, n).is_dir()}
        return sorted(owned)

    def _clear_interrupted_writes(self, previous: RunRecord) -> None:
        """Remove the temporary files of writes a killed run left half done (only names
        the atomic writer makes, only in the folders this run owns)."""
        folders = [self.out, self.out / "report_files"]
        folders += [self.out / STAGES_DIR / name for name in self._owned_folders(previous)]
        for folder in folders:
            if folder.is_dir() and not folder.is_symlink():
                for path in folder.iterdir():
                    if is_temp_name(path.name) and path.is_file() and not path.is_symlink():
                        path.unlink()

    def _claim(self, record: RunRecord, folder: Path) -> None:
        """Record ``folder`` as this run's before creating it, so that a run killed inside
        the stage still knows the folder is its own to resume or remove.

        Raises:
            UserError: the folder exists but netshrink did not make it.
        """
        if folder.name not in record.folders:
            if folder.exists() or folder.is_symlink():
                raise UserError(f"{folder} exists but was not made by this run; move it away "
                                "or choose another --out")
            record.folders.append(folder.name)
            self._write(record)
        folder.mkdir(parents=True, exist_ok=True)

    def _move(self, record: RunRecord, prior: StageRecord, index: int,
              stage_dir: Path) -> None:
        """Give a reused stage its new position's folder (stages before it came or went)."""
        assert prior.artifact is not None
        old_file = self.out / prior.artifact
        old_dir = self.out.joinpath(*Path(prior.artifact).parts[:2])  # stages/NN-name
        if old_dir.resolve() != stage_dir.resolve():
            if stage_dir.exists():
                if stage_dir.name not in record.folders:
                    raise UserError(f"{stage_dir} exists but was not made by this run; move "
                                    "it away or choose another --out")
                shutil.rmtree(stage_dir)
            elif stage_dir.name not in record.folders:
                record.folders.append(stage_dir.name)
            old_dir.rename(stage_dir)
            prior.artifact = str((stage_dir / old_file.relative_to(old_dir))
                                 .relative_to(self.out))
        prior.index = index
        prior.name = stage_dir.name.split("-", 1)[1]
