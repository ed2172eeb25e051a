"""How a run measures its stages: as the recipe's ``measure:`` section says, each model in
the runtime it runs in, a finished stage again when the section changed."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from torch import nn

from netshrink.bench import Measurement, MeasureOptions, environment, measure
from netshrink.bench.measure import file_size
from netshrink.bench.schema import MAX_HITS_IMAGES, Environment
from netshrink.data import DataBundle
from netshrink.errors import UserError
from netshrink.limits import read_regular
from netshrink.recipe.keys import measure_key, sha
from netshrink.recipe.schema import Recipe
from netshrink.runtime import ModelStats, RuntimeModule, open_runtime
from netshrink.runtime.base import Executable
from netshrink.stages.record import StageRecord
from netshrink.store.atomic import atomic_write_text
from netshrink.store.checkpoint import load_model
from netshrink.store.digest import file_sha256
from netshrink.store.layout import MODEL_FILE
from netshrink.store.walls import make_dirs

__all__ = ["StageMeasurer"]

MAX_KEPT_BYTES = 1 << 20  # a kept measurement is a few kilobytes of JSON


class StageMeasurer:
    """Measures the models of one run (the recipe's settings, its folder).

    ``reuse``: a folder of earlier measurements, kept by the SHA-256 of the measured file,
    the settings and the machine. A one-off command (``netshrink prune --weights F``)
    measures the same input file every call; with ``reuse`` the baseline is measured once
    per file, and later calls take that measurement, saying so in the stage's notes.
    ``reuse_all`` extends this to every torch model a stage leaves: the cells of a study
    share their trained models through the cache (the same file, byte for byte), so each
    is measured once, not once per cell.
    """

    def __init__(self, recipe: Recipe, out: Path, data: DataBundle,
                 reuse: Path | None = None, *, reuse_all: bool = False) -> None:
        self.recipe = recipe
        self.out = out
        self.data = data
        self.reuse = reuse
        self.reuse_all = reuse_all and reuse is not None

    def baseline(self, model: nn.Module, file: Path, notes: list[str]) -> Measurement:
        """The baseline's measurement: an earlier one of the same weights file, settings
        and machine when ``reuse`` allows, else measured now (and kept for next time)."""
        weights = self.recipe.model.weights
        if weights is None or self.untrained_start():
            return self.torch_stage(model, file, notes)
        return self._kept(model, file, weights, notes)

    def torch_stage(self, model: nn.Module, file: Path, notes: list[str]) -> Measurement:
        """A stage's torch model (saved as ``file``): kept and reused by the file's
        SHA-256 when ``reuse_all``, else measured now."""
        if not self.reuse_all:
            return self.model(model, file)
        return self._kept(model, file, file, notes)

    def _kept(self, model: nn.Module, file: Path, identity: Path, notes: list[str]
              ) -> Measurement:
        """An earlier measurement of the file ``identity`` (by SHA-256) with these
        settings on this machine, else ``model`` measured now and kept."""
        if self.reuse is None:
            return self.model(model, file)
        parts = [file_sha256(identity), measure_key(self.recipe),
                 self.recipe.data.model_dump(mode="json", exclude={"num_workers"}),
                 self.recipe.model.model_dump(mode="json", exclude={"weights"})]
        if self.data.fingerprint is not None:  # a factory's data: what it returned
            parts.append(self.data.fingerprint)
        key = sha(parts)
        kept = self.reuse / f"{key}.json"
        here = environment(device=self.recipe.device, threads=self.recipe.measure.threads,
                           seed=self.recipe.seed)
        try:
            old = Measurement.model_validate_json(
                read_regular(kept, "kept measurement", max_bytes=MAX_KEPT_BYTES))
        except (UserError, ValueError):
            old = None
        if old is not None and _same_machine(old.environment, here) and _has_hits(old):
            notes.append(f"measurement of {identity.name} reused from an earlier run on this "
                         "machine with the same settings (same file by SHA-256): not "
                         "measured again")
            rel, size = file_size(file, self.out)
            return old.model_copy(update={"file": rel, "size_bytes": size})
        measured = self.model(model, file)
        with contextlib.suppress(OSError):  # a cache that cannot be written: measured anyway
            make_dirs(self.reuse)
            atomic_write_text(kept, measured.model_dump_json())
        return measured

    def model(self, model: nn.Module, file: Path, sizes: dict[str, int] | None = None,
              precision: str | None = None, *, counts_only: bool = False) -> Measurement:
        """Measure ``model`` (saved as ``file``) as the measure section says;
        ``counts_only``: params, MACs and size alone (a fresh, untrained model, whose
        accuracy is chance and whose speed the stage that trains it measures)."""
        m = self.recipe.measure
        data = self.data
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

    def cpu_timing(self, model: nn.Module, file: Path) -> Measurement | None:
        """The torch ``model`` timed on the CPU as well, when ``measure.also_cpu`` asks for
        it in a GPU recipe (speed and memory only: the same weights give the same answers);
        None otherwise."""
        if not self.wants_cpu_timing():
            return None
        m = self.recipe.measure
        info = self.data.info
        options = MeasureOptions(device="cpu", threads=m.threads, seed=self.recipe.seed,
                                 batch_size=m.batch_size)
        return measure(model, input_shape=[info.in_channels, info.image_size, info.image_size],
                       file=file, run_dir=self.out, options=options)

    def wants_cpu_timing(self) -> bool:
        """Whether torch stages are also timed on the CPU (``measure.also_cpu``, GPU)."""
        m = self.recipe.measure
        return m.also_cpu and m.latency and self.recipe.device != "cpu"

    def remeasure_cpu(self, prior: StageRecord) -> Measurement | None:
        """``cpu_timing`` of a finished stage whose result is a plain torch model file."""
        old = prior.measurement
        if (not self.wants_cpu_timing() or old is None or old.runtime != "torch"
                or old.runtime_options or old.accuracy is None or prior.artifact is None
                or not prior.artifact.endswith(MODEL_FILE)):
            return None
        return self.cpu_timing(load_model(self.out / prior.artifact)[0],
                               self.out / prior.artifact)

    def saved_file(self, file: Path, runtime: str, stats: ModelStats, precision: str | None,
                   sizes: dict[str, int] | None, options: dict[str, Any] | None = None
                   ) -> Measurement:
        """Open a saved model in its runtime (prepared as ``options`` say) and measure it."""
        info = self.data.info
        model = open_runtime(file, runtime, stats=stats, threads=self.recipe.measure.threads,
                             precision=precision, device=self.recipe.device, options=options,
                             input_shape=[info.in_channels, info.image_size, info.image_size])
        try:
            return self.model(model, file, sizes, precision)
        finally:
            if isinstance(model, Executable):
                model.close()  # sessions, compiled graphs and their GPU memory go now

    def remeasure(self, prior: StageRecord) -> Measurement:
        """Measure a finished stage's file again (the measure section changed)."""
        old = prior.measurement
        assert old is not None and prior.artifact is not None  # a finished stage has both
        # Every file reopens in the runtime it was measured in (torch files too), with the
        # counts it was measured with (a runtime's graph hides them).
        stats = ModelStats(params=old.params, nonzero_params=old.nonzero_params, macs=old.macs)
        if prior.index == 0 and self.untrained_start():
            return self.model(load_model(self.out / prior.artifact)[0],
                              self.out / prior.artifact, counts_only=True)
        return self.saved_file(self.out / prior.artifact, old.runtime, stats, old.precision,
                               old.sizes, old.runtime_options)

    def untrained_start(self) -> bool:
        """The baseline is a fresh init that later stages train: not worth evaluating."""
        return self.recipe.model.weights is None and bool(self.recipe.stages)


def _same_machine(a: Environment, b: Environment) -> bool:
    """Whether two measurements were taken where their timings compare: the same CPU,
    cores, GPU, device, threads and versions."""
    keys = ("cpu", "cores", "gpu", "device", "threads", "versions", "python")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _has_hits(m: Measurement) -> bool:
    """Whether a kept measurement's accuracy carries its per-image hits where netshrink
    now records them: one kept before they were recorded is measured again, so that the
    compress search can compare its candidates image by image."""
    acc = m.accuracy
    return acc is None or acc.correct is not None or acc.images > MAX_HITS_IMAGES
