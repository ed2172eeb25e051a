"""The compression search: composed methods on the input model, each candidate a recipe
run through the model cache and recorded in the results store, judged on a held-out
validation split, the chosen one then measured on the test split.

A candidate is (channel ratio, residual blocks removed, sparsity) followed by the
deployment the target asks for. Its recipe, on the input weights:

    prune.channel (l2; the ratio shared out among the coupled groups by a sensitivity
                   scan on the validation split) -> finetune with KD from the input model
    prune.blocks  (the least harmful blocks, by a scan) -> finetune with KD
    prune.magnitude (global)                 -> finetune with KD (zeros kept)
    size:    quant.kmeans (2**bits shared values a layer, packed .nspk file)
    latency: quant.ptq on the runtime, layers that cost accuracy left in float

The search walks the channel ratios upwards (0 first) until a candidate's deployable
file loses more than the budget on the validation images, then the numbers of blocks
removed on the last ratio that held, and for ``size`` then the sparsities on the last
structure that held. For ``latency`` blocks come first (then the channel ratios on the
deepest cut that held, shared out by compute): at batch 1 a layer removed saves its
whole per-call cost, whatever its width. Candidates share their prefixes
through the cache (the 0.5-sparsity model of ratio 0.35 is fine-tuned once), and a
finished candidate is never run again: an interrupted search resumes where it stopped.
Of every candidate within the budget the smallest file (or lowest batch-1 latency) is
chosen; it is then run once more with the test split measured, which is what the
report quotes, so the images that decided are never the images that report.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink.bench.schema import Accuracy, Measurement
from netshrink.bench.timing import time_model
from netshrink.compress.candidates import (
    Candidate,
    base_recipe,
    candidate_recipe,
)
from netshrink.compress.guard import compress_headline, split_warning
from netshrink.compress.latency_probes import PROBE_WARM_S, warm_up
from netshrink.compress.options import CompressConfig
from netshrink.compress.side_by_side import PickSpeed, time_pick_side_by_side
from netshrink.errors import UserError
from netshrink.heartbeat import heartbeat, marking
from netshrink.models import io_widths
from netshrink.recipe import run_recipe
from netshrink.runtime.files import open_model_file
from netshrink.stages.record import SideBySide, StageRecord
from netshrink.store.walls import make_dirs, owned_folder
from netshrink.study.execute import (
    CELLS_DIR,
    DB_FILE,
    check_study_folder,
    run_cell,
    write_study_record,
)
from netshrink.study.report import render_study_report
from netshrink.study.results import ResultsStore
from netshrink.study.schema import Cell

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

CHOSEN_DIR = "chosen"  # the chosen candidate, measured on the test split
RETIME_ROUNDS = 5  # round-robin re-timings of the latency candidates within the budget


@dataclass
class Trial:
    """A finished candidate: its deployable file's figures on the validation split."""

    candidate: Candidate
    top1: float
    size_bytes: int | None
    p50_ms: float | None
    artifact: str | None
    within: bool
    ref_top1: float | None = None  # the input model on the same images
    upper_points: float | None = None  # the drop's upper confidence bound (halving)
    accuracy: Accuracy | None = None  # the deployable (or float) model on val
    macs: int | None = None
    nonzero_params: int | None = None
    params: int | None = None
    predicted_ms: float | None = None  # the latency model's batch-1 p50, before training
    batch_ms: float | None = None  # the p50 of a call of ``measure_batch`` images
    predicted_batch_ms: float | None = None  # and its prediction, before training
    # wall time of its run in this call (0: recorded before); not part of what it is
    seconds: float = field(default=0.0, compare=False)

    @property
    def drop_points(self) -> float:
        return ((self.ref_top1 or 0.0) - self.top1) * 100

    def describe(self, ref_top1: float) -> str:
        size = f"{self.size_bytes / 1e6:.3f} MB" if self.size_bytes else "size ?"
        p50 = f", p50 {self.p50_ms:.3f} ms" if self.p50_ms else ""
        if self.predicted_ms and not self.p50_ms:
            p50 = f", p50 {self.predicted_ms:.3f} ms predicted"
        bound = (f", at most {self.upper_points:.2f} lost at the confidence asked"
                 if self.upper_points is not None else "")
        return (f"{self.candidate.name}: val top-1 {self.top1:.2%} "
                f"({(self.top1 - ref_top1) * 100:+.2f} points{bound}), {size}{p50}")


@dataclass
class CompressResult:
    """What the search found. ``deployable`` is the chosen file in ``out/chosen``."""

    out: Path
    reference_top1: float  # the input model on the validation split
    trials: list[Trial] = field(default_factory=list)
    front: list[str] = field(default_factory=list)  # Pareto (size, latency, top-1)
    chosen: Trial | None = None
    deployable: Path | None = None
    test: dict[str, Any] = field(default_factory=dict)  # the chosen and reference on test
    report: Path | None = None
    # The chosen candidate's deploying stage in its test-split run (``out/chosen``):
    # its file, runtime and measurement, for a recipe stage to hand on.
    deploy_stage: StageRecord | None = None
    # The chosen file's batch-1 speed against the input model, both timed side by side
    # at the end of the search (``side_by_side.json``); None: not timed so, or noisy.
    speed: PickSpeed | None = None


class Search:
    """One search into ``out`` (see the module docstring)."""

    def __init__(self, model: dict[str, Any], data: dict[str, Any], cfg: CompressConfig,
                 out: Path, *, device: str = "cpu", log: Callable[[str], None] = LOG.info,
                 notes: list[str] | None = None, module: nn.Module | None = None,
                 before_first_write: Callable[[], None] | None = None) -> None:
        if cfg.judges_speed and not cfg.timing:
            raise UserError("--target latency (and a latency constraint) needs timing; "
                            "leave out --no-timing")
        self.cfg, self.out, self.log, self.device = cfg, out, marking(log), device
        self.name = f"compress-{out.resolve().name}"
        self.base = base_recipe(model, data, cfg, device)
        self.base_test = base_recipe(model, data, cfg, device, split="test")
        # halving's first rung judges float models by top-1 alone (the latency model
        # predicts their speed): not timed
        self.base_float = base_recipe(model, data, cfg, device, timing=False)
        self.ref_accuracy: Accuracy | None = None
        self.db = out / DB_FILE
        self.cells: list[Cell] = []
        self.notes = list(notes or [])  # the report's first lines (about the split)
        self.ref_top1: float | None = None
        self.retimed: dict[str, float] = {}  # the side-by-side batch-1 p50s that chose
        self.started = time.perf_counter()
        # what must be written into ``out`` once every check has passed (the input
        # model of ``netshrink.compress(module, ...)``, which the candidates start from)
        self.before_first_write = before_first_write
        # depth pruning as far as the network allows (a ResNet's stages keep one block)
        most = _removable_blocks(model, data, module)
        self.drop_blocks = [n for n in cfg.drop_blocks if n <= most]

    def _most(self) -> int:
        structures = 1 + len(self.cfg.channel_ratios) + len(self.drop_blocks) + (
            len(self.cfg.sparsities) if self.cfg.target == "size" else 0)
        if self.cfg.deploy_method == "kmeans":
            # A structure tries the widths upwards from the last that held until one
            # holds; one that holds at none has tried them all (the bound was once
            # structures + widths - 1, which such structures overran).
            return structures * len(self.cfg.kmeans_bits)
        return structures

    def run(self) -> CompressResult:
        # Every write and removal under ``out`` is checked for planted links.
        with owned_folder(self.out, "compress"), heartbeat("compress", self.log):
            return self._run()

    def _run(self) -> CompressResult:
        check_study_folder(self.out, self.name, what="compress")
        # every candidate's recipe is valid before the first one runs
        for ratio in (0.0, *self.cfg.channel_ratios):
            candidate_recipe(self.base, self.cfg, Candidate(ratio, 0.0), self.name)
        if self.db.exists():
            with ResultsStore(self.db, readonly=True):
                pass  # refuses a bad database before anything is written
        make_dirs(self.out)
        if self.before_first_write is not None:
            self.before_first_write()
        with ResultsStore(self.db):
            pass
        self.log(self._opening())
        return self._finish(self._explore())

    def _opening(self) -> str:
        return (f"compress: target {self.cfg.target}, budget {self.cfg.budget_points:g} "
                f"points of validation top-1 ({self.cfg.reserve_points:g} kept in reserve), "
                f"at most {self._most()} candidates")

    def _explore(self) -> list[Trial]:
        """The walk (see the module docstring): every candidate it ran."""
        trials: list[Trial] = []
        channels, blocks = 0.0, 0
        if self.cfg.blocks_first:
            blocks = self._walk_blocks(channels, trials, first=True)
            if any(t.within for t in trials):
                channels = self._walk_channels(blocks, trials)
        else:
            channels = self._walk_channels(blocks, trials, first=True)
            if any(t.within for t in trials):
                blocks = self._walk_blocks(channels, trials)
        if self.cfg.target == "size" and any(t.within for t in trials):
            for sparsity in self.cfg.sparsities:
                if not self._structure(channels, sparsity, trials, blocks=blocks):
                    break
        return trials

    def _walk_channels(self, blocks: int, trials: list[Trial], first: bool = False
                       ) -> float:
        """The channel ratios upwards (from 0 when ``first``) on ``blocks``: the last
        that held."""
        held = 0.0
        for ratio in ((0.0,) if first else ()) + tuple(self.cfg.channel_ratios):
            if not self._structure(ratio, 0.0, trials, blocks=blocks):
                break
            held = ratio
        return held

    def _walk_blocks(self, channels: float, trials: list[Trial], first: bool = False
                     ) -> int:
        """The block counts upwards (from 0 when ``first``) on ``channels``: the last
        that held."""
        held = 0
        for count in ((0,) if first else ()) + tuple(self.drop_blocks):
            if not self._structure(channels, 0.0, trials, blocks=count):
                break
            held = count
        return held

    def _structure(self, channels: float, sparsity: float, trials: list[Trial],
                   blocks: int = 0) -> bool:
        """Deploy one structure; with k-means, the narrowest width (from the one the last
        structure needed) that keeps the budget. Whether it kept it."""
        if self.cfg.deploy_method != "kmeans":
            return self._trial(Candidate(channels, sparsity, blocks=blocks), trials).within
        held = [t.candidate.bits for t in trials if t.within and t.candidate.bits]
        widths = [b for b in self.cfg.kmeans_bits if b >= (held[-1] if held else 0)]
        return any(self._trial(Candidate(channels, sparsity, b, blocks), trials).within
                   for b in widths)

    def _trial(self, cand: Candidate, trials: list[Trial], label: str | None = None
               ) -> Trial:
        """Run ``cand`` (unless recorded before with the same recipe) and read it."""
        cell = self._cell(cand)
        k = len(trials) + 1
        label = label or f"candidate {k} of at most {self._most()}"
        seconds = 0.0
        if self._recorded(cell):
            self.log(f"{label}: {cand.name} (recorded before)")
        else:
            self.log(f"{label}: {cand.name}: running")
            seconds = run_cell(self.name, cell.name, cell.axes,
                               cell.recipe.model_dump(mode="json"),
                               str(self.out / CELLS_DIR / cell.name), str(self.db),
                               log=lambda line: self.log(f"  [{cand.name}] {line}"))
        trial = self._read_trial(cand)
        trial.seconds = seconds
        trials.append(trial)
        self._judge(trial)
        assert self.ref_top1 is not None
        best = self._best(trials)
        elapsed = (time.perf_counter() - self.started) / 60
        self.log(f"{label}: {trial.describe(self.ref_top1)}; "
                 f"{'within' if trial.within else 'over'} the budget; best so far: "
                 + (best.describe(self.ref_top1) if best else "none") + f"; {elapsed:.1f} min")
        return trial

    def _judge(self, trial: Trial) -> Trial:
        """``trial`` judged (the walk: as read, against the budget less the reserve)."""
        return trial

    def _cell(self, cand: Candidate) -> Cell:
        """The candidate as a cell of the results store (added to the search record)."""
        base = self.base if cand.deployed else self.base_float
        recipe = candidate_recipe(base, self.cfg, cand, f"{self.name}.{cand.name}")
        axes = {"channels": f"{cand.channels:g}", "blocks": str(cand.blocks),
                "sparsity": f"{cand.sparsity:g}"}
        if cand.bits is not None:
            axes["bits"] = str(cand.bits)
        if cand.rung is not None:
            axes["rung"] = str(cand.rung)
        if cand.runtime is not None:
            axes["runtime"] = cand.runtime
        cell = Cell(name=cand.name, axes=axes, recipe=recipe)
        if all(c.name != cell.name for c in self.cells):
            self.cells.append(cell)
            self._write_record()
        return cell

    def _recorded(self, cell: Cell) -> bool:
        with ResultsStore(self.db) as store:
            done = {c.cell: c.recipe_sha256 for c in store.cells(self.name)}
        return done.get(cell.name) == cell.recipe_sha256

    def _read_trial(self, cand: Candidate) -> Trial:
        with ResultsStore(self.db) as store:
            rows = [r for r in store.rows(self.name) if r["cell"] == cand.name]
        baseline, deploy = rows[0], rows[-1]
        size, artifact = deploy["size_bytes"], deploy["artifact"]
        measured = _measurement(deploy["record"])
        smallest = measured.smallest_size
        if self.cfg.for_size and smallest is not None and smallest != size and artifact:
            # the INT8 model's packed file loads and runs in the runtime too: the small one
            size, artifact = smallest, str(Path(artifact).with_suffix(".nspk"))
        if baseline["top1"] is None or deploy["top1"] is None:
            raise UserError(f"candidate {cand.name}: no validation top-1 was measured; "
                            "the data needs a validation split (--val-size)")
        if self.ref_top1 is None:
            self.ref_top1 = baseline["top1"]
            self.ref_accuracy = _measurement(baseline["record"]).accuracy
            images = self.ref_accuracy.images if self.ref_accuracy else 0
            warning = split_warning(images, self.cfg.budget_points, self.cfg.confidence
                                    ) if images else None
            if warning:
                self.log(f"compress: warning: {warning}")
                self.notes.append(f"warning: {warning}")
        floor = self.ref_top1 - self.cfg.spendable_points / 100
        batch = measured.throughput
        return Trial(candidate=cand, top1=deploy["top1"], size_bytes=size,
                     p50_ms=deploy["latency_p50_ms"], artifact=artifact,
                     batch_ms=(batch.p50_ms if batch is not None
                               and batch.batch_size == self.cfg.measure_batch else None),
                     within=deploy["top1"] >= floor - 1e-12, ref_top1=self.ref_top1,
                     accuracy=measured.accuracy, macs=measured.macs,
                     nonzero_params=measured.nonzero_params, params=measured.params)

    def _best(self, trials: list[Trial]) -> Trial | None:
        within = [t for t in trials if t.within]
        if self.cfg.target == "latency":
            within = [t for t in within if t.p50_ms]
            return min(within, key=lambda t: t.p50_ms or 0.0, default=None)
        return min(within, key=lambda t: t.size_bytes or 0, default=None)

    def _split_notes(self, result: CompressResult) -> list[str]:
        """Which images decided, and which report (the report's first lines)."""
        test = result.test.get("chosen", {}).get("accuracy") or {}
        ref = result.test.get("reference", {}).get("accuracy") or {}
        with ResultsStore(self.db) as store:
            images = next((r["images"] for r in store.rows(self.name) if r["images"]), None)
        where = ("(the data's own validation images, or data.val_size held out of its "
                 "training images)" if "factory" in self.base["data"]
                 else "held out of the training images (data.val_size)")
        lines = [f"Decided on the validation split: {images or self.cfg.val_size:,} images "
                 f"{where}; the candidates were "
                 "fine-tuned without them. Every figure below is on those images. "
                 + self._within_rule(),
                 *(n[0].upper() + n[1:].rstrip(".") + "." for n in self.notes)]
        if self.retimed:
            by = ("the geometric mean of batch-1 p50 and batch-call time an image"
                  if self.cfg.ranks_batch_too else "batch-1 p50")
            lines.append(
                f"Chosen by {by} timed again side by side ({RETIME_ROUNDS} rounds "
                "round-robin, medians; the table's timings were taken minutes apart); "
                "batch-1 p50s: "
                + ", ".join(f"{name} {p50:.3f} ms" for name, p50 in self.retimed.items())
                + ".")
        if test and ref:
            lines.append(
                f"Reported on the test split ({test['images']:,} images, never used to "
                f"decide): the chosen {result.chosen.candidate.name if result.chosen else ''}"
                f" {test['top1']:.2%} top-1 against the input model's {ref['top1']:.2%} "
                f"({(test['top1'] - ref['top1']) * 100:+.2f} points); its run with every "
                f"figure on the test split: {CHOSEN_DIR}/report.md.")
        return lines

    def _within_rule(self) -> str:
        """How a candidate counted as within the budget, in a sentence."""
        if self.cfg.search == "walk":
            return (f"A candidate counted as within the budget when it lost at most "
                    f"{self.cfg.spendable_points:g} points there (the "
                    f"{self.cfg.budget_points:g}-point budget less a reserve of "
                    f"{self.cfg.reserve_points:g} against the noise of choosing on these "
                    "images).")
        return (f"A deployed candidate counted as within the {self.cfg.budget_points:g}-"
                f"point budget when the upper bound of its drop at {self.cfg.confidence:.0%}"
                " confidence was, the drop taken image by image against the input model "
                "on the same images (not when its point estimate was).")

    def _write_record(self, chosen: str | None = None, notes: list[str] | None = None,
                      headline: str | None = None) -> None:
        write_study_record(self.out, self.name, self.cells, self.db,
                           spec={"compress": self.cfg.model_dump(mode="json"),
                                 "recipe": self.base},
                           report={"accuracy_budget": self.cfg.budget_points,
                                   "baseline": "baseline"}, chosen=chosen, notes=notes,
                           headline=headline)

    def _to_retime(self, trials: list[Trial]) -> list[Trial]:
        """The files timed again side by side before choosing (the walk: the latency
        candidates within the budget)."""
        within = [t for t in trials if t.within and t.artifact]
        return within if self.cfg.target == "latency" else []

    def _retime_side_by_side(self, trials: list[Trial]) -> None:
        """Time the candidates that may be chosen again, round-robin in this process,
        and keep each one's median batch-1 p50: each was timed minutes apart from the
        others, and on a shared machine that drift is larger than the differences the
        pick turns on (measured here: a 4x smaller model timed slower than the one it
        beat)."""
        chosen_from = self._to_retime(trials)
        if len(chosen_from) < 2:
            return
        self.log(f"compress: timing the {len(chosen_from)} candidates that may be chosen "
                 f"side by side, batch 1, {RETIME_ROUNDS} rounds round-robin")
        self.retime(chosen_from, RETIME_ROUNDS)
        self.retimed = {t.candidate.name: t.p50_ms or 0.0 for t in chosen_from}

    def retime(self, trials: list[Trial], rounds: int, batch: int = 1) -> list[float]:
        """The median of ``rounds`` timings of each of ``trials``, taken round-robin in
        this process, in ms a call of ``batch`` images; at batch 1 each trial's p50 is
        replaced by it, at ``measure_batch`` its ``batch_ms``."""
        # Opening a runtime (OpenVINO compiles) and a round at batch N can each take
        # long, with no line between them.
        with heartbeat(f"compress: timing {len(trials)} candidates", self.log):
            medians = self._round_robin(trials, rounds, batch)
        for trial, ms in zip(trials, medians, strict=True):
            if batch == 1:
                trial.p50_ms = ms
                self.log(f"  {trial.candidate.name}: p50 {ms:.3f} ms")
            else:
                if batch == self.cfg.measure_batch:
                    trial.batch_ms = ms
                self.log(f"  {trial.candidate.name}: batch {batch} at "
                         f"{batch * 1000 / ms:,.0f} img/s")
        return medians

    def _round_robin(self, trials: list[Trial], rounds: int, batch: int) -> list[float]:
        """Each trial's file timed ``rounds`` times round-robin: the median ms a call."""
        threads = self.cfg.timing_threads
        opened = [open_model_file(self.out / CELLS_DIR / t.candidate.name / str(t.artifact),
                                  threads=threads) for t in trials]
        times: list[list[float]] = [[] for _ in trials]
        try:
            for _ in range(rounds):
                for own, model in zip(times, opened, strict=True):
                    one = torch.randn(batch, *(model.input_shape or [1, 28, 28]))
                    # a session called again after others ran is slow for a while: a
                    # time of calls covers that, a count of calls did not (latency_probes)
                    warm_up(model.module, one, PROBE_WARM_S)
                    own.append(time_model(model.module, one, warmup=20 if batch == 1 else 2,
                                          runs=100 if batch == 1 else 10,
                                          min_seconds=0.3, threads=threads,
                                          rounds=1).p50_ms)
        finally:
            for model in opened:
                model.close()
        return [statistics.median(own) for own in times]

    def _finish(self, trials: list[Trial]) -> CompressResult:
        assert self.ref_top1 is not None
        self._retime_side_by_side(trials)
        result = CompressResult(out=self.out, reference_top1=self.ref_top1, trials=trials)
        # the front in three dimensions: no other candidate is as small, as fast and as
        # accurate and better in one (without timing, in size and top-1 alone)
        files = [t for t in trials if t.candidate.deployed]
        result.front = [t.candidate.name for t in files
                        if not any(_dominates(o, t) for o in files if o is not t)]
        result.chosen = self._choose(trials)
        if result.chosen is None:
            self.log(f"compress: {self._none_chosen()}")
            time_pick_side_by_side(self.out, None, None, self.log)  # an older pick's goes
            self._write_record(notes=self._split_notes(result),
                               headline=self._headline(result))
        else:
            self.log(f"compress: chosen {result.chosen.candidate.name}; measuring it on the "
                     "test split")
            run_timing = self._measure_on_test(result)
            result.speed = time_pick_side_by_side(self.out, result.chosen.candidate.name,
                                                  run_timing, self.log)
            self._write_record(chosen=result.chosen.candidate.name,
                               notes=self._split_notes(result),
                               headline=self._headline(result))
        result.report = render_study_report(self.out, self.db)[0]
        self.log(f"compress: {self._headline(result)}")
        return result

    def _headline(self, result: CompressResult) -> str:
        """The report's first line: the pick on the test split, then on validation."""
        def accuracy(which: str) -> Accuracy | None:
            got = (result.test.get(which) or {}).get("accuracy")
            return Accuracy.model_validate(got) if got else None

        ref = result.test.get("reference") or {}
        chosen, speed = result.chosen, result.speed
        return compress_headline(
            chosen=chosen.candidate.name if chosen else None,
            budget_points=self.cfg.budget_points, ref_test=accuracy("reference"),
            chosen_test=accuracy("chosen"), ref_val=self.ref_accuracy,
            chosen_val=chosen.accuracy if chosen else None,
            ref_size_bytes=ref.get("size_bytes"),
            chosen_size_bytes=chosen.size_bytes if chosen else None,
            ref_p50_ms=speed.reference_ms if speed else None,
            chosen_p50_ms=speed.pick_ms if speed else None,
            runtime=speed.pick_runtime if speed else None,
            against=(f"the input model in {speed.reference_runtime}" if speed
                     else "the input model"),
            speed_how="timed side by side at the end of the search",
            confidence=self.cfg.confidence, why_none=self._none_chosen())

    def _choose(self, trials: list[Trial]) -> Trial | None:
        return self._best(trials)

    def _none_chosen(self) -> str:
        return ("no candidate stays within the budget (not even the deployment of the "
                "unpruned model); raise --budget-points")

    def _measure_on_test(self, result: CompressResult) -> SideBySide | None:
        """Run the pick again with the test split measured, into ``out/chosen``; that
        run's files as timed side by side at its end."""
        assert result.chosen is not None
        cand = result.chosen.candidate
        recipe = candidate_recipe(self.base_test, self.cfg, cand, f"{self.name}.{CHOSEN_DIR}")
        folder = self.out / CHOSEN_DIR
        record = run_recipe(recipe, folder, log=lambda line: self.log(f"  [test] {line}"),
                            reuse_measurements=True)
        first, last = record.stages[0], record.stages[-1]
        assert first.measurement is not None and last.measurement is not None
        result.deployable = folder / last.artifact if last.artifact else None
        result.deploy_stage = last
        sizes = last.measurement.sizes or {}
        if self.cfg.target == "size" and "packed" in sizes and result.deployable:
            result.deployable = result.deployable.with_suffix(".nspk")
        result.test = {"split": "test", "reference": first.measurement.model_dump(mode="json"),
                       "chosen": last.measurement.model_dump(mode="json")}
        return record.side_by_side


def _removable_blocks(model: dict[str, Any], data: dict[str, Any],
                      module: nn.Module | None = None) -> int:
    """How many residual blocks depth pruning may remove from the model section's
    network, or from ``module`` when given (0 for a network without any)."""
    from netshrink.models.factory import trusting
    from netshrink.prune.blocks import most_removable
    from netshrink.store.checkpoint import load_model

    meta: dict[str, Any] = {}
    if module is None and model.get("weights"):
        with trusting([model["factory"]] if model.get("factory") else []):  # as its recipe
            module, _, meta = load_model(Path(model["weights"]))
    if module is None:
        return 0
    channels = io_widths(module)[0] or 1
    size = data.get("image_size") or meta.get("image_size") or 28
    return most_removable(module, [channels, size, size])


def _measurement(record_json: str) -> Measurement:
    """The measurement in a results-store row's stage record."""
    m = StageRecord.model_validate_json(record_json).measurement
    assert m is not None  # the store keeps measured stages only
    return m


def _dominates(a: Trial, b: Trial) -> bool:
    """``a`` is at least as small, as fast and as accurate as ``b``, and better in one."""
    ge = ((a.size_bytes or 0) <= (b.size_bytes or 0) and (a.p50_ms or 0) <= (b.p50_ms or 0)
          and a.top1 >= b.top1)
    gt = ((a.size_bytes or 0) < (b.size_bytes or 0) or (a.p50_ms or 0) < (b.p50_ms or 0)
          or a.top1 > b.top1)
    return ge and gt


def compress(model: dict[str, Any], data: dict[str, Any], out: Path,
             cfg: CompressConfig | None = None, *, device: str = "cpu",
             log: Callable[[str], None] = LOG.info, notes: list[str] | None = None,
             module: nn.Module | None = None,
             before_first_write: Callable[[], None] | None = None) -> CompressResult:
    """Search composed methods on the model ``model`` (a recipe's model section, with
    ``weights``) for the smallest (or fastest) deployable file within the budget.

    ``module`` is the model itself when its weights file is yet to be written (by
    ``before_first_write``, called once every check has passed).

    Raises:
        UserError: bad settings, model, data or ``out`` (before anything is written).
    """
    return make_search(model, data, cfg or CompressConfig(), Path(out), device=device,
                       log=log, notes=notes, module=module,
                       before_first_write=before_first_write).run()


def make_search(model: dict[str, Any], data: dict[str, Any], cfg: CompressConfig, out: Path,
                **kwargs: Any) -> Search:
    """The search ``cfg.search`` names, into ``out``."""
    if cfg.search == "walk":
        return Search(model, data, cfg, out, **kwargs)
    from netshrink.compress.halving import HalvingSearch  # it builds on Search

    return HalvingSearch(model, data, cfg, out, **kwargs)
