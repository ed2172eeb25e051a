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

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink.bench.options import MeasureOptions
from netshrink.bench.schema import Measurement
from netshrink.bench.timing import time_model
from netshrink.compress.options import CompressConfig
from netshrink.errors import UserError
from netshrink.models import io_widths
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.recipe.schema import Recipe
from netshrink.runtime.files import open_model_file
from netshrink.stages.record import StageRecord
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

CHOSEN_DIR = "chosen"  # the chosen candidate, measured on the test split
RETIME_ROUNDS = 5  # round-robin re-timings of the latency candidates within the budget


@dataclass(frozen=True)
class Candidate:
    """One point of the search space."""

    channels: float
    sparsity: float
    bits: int | None = None  # k-means index width; None: INT8
    blocks: int = 0  # residual blocks removed

    @property
    def name(self) -> str:
        name = f"ch{self.channels:g}" + (f"-d{self.blocks}" if self.blocks else "")
        name += f"-sp{self.sparsity:g}"
        return name if self.bits is None else f"{name}-b{self.bits}"


@dataclass
class Trial:
    """A finished candidate: its deployable file's figures on the validation split."""

    candidate: Candidate
    top1: float
    size_bytes: int | None
    p50_ms: float | None
    artifact: str | None
    within: bool

    def describe(self, ref_top1: float) -> str:
        size = f"{self.size_bytes / 1e6:.3f} MB" if self.size_bytes else "size ?"
        p50 = f", p50 {self.p50_ms:.3f} ms" if self.p50_ms else ""
        return (f"{self.candidate.name}: val top-1 {self.top1:.2%} "
                f"({(self.top1 - ref_top1) * 100:+.2f} points), {size}{p50}")


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


def candidate_stages(cfg: CompressConfig, cand: Candidate) -> list[dict[str, Any]]:
    """The stages of one candidate (see the module docstring)."""
    kd = {"teacher_stage": "baseline", "alpha": cfg.alpha, "temperature": cfg.temperature}
    finetune = {"kind": "finetune", "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr,
                "batch_size": cfg.batch_size, "distill": kd, "amp": cfg.amp}
    if cfg.max_steps is not None:
        finetune["max_steps"] = cfg.max_steps
    channels: list[dict[str, Any]] = []
    if cand.channels:
        channels = [{"kind": "prune.channel", "name": "channels", "ratio": cand.channels,
                     "importance": "l2", "scope": cfg.channel_scope,
                     "scan_images": min(1000, cfg.val_size)}
                    | ({"round_to": cfg.round_to} if cfg.round_to > 1 else {})
                    | ({"share_by": "macs"} if cfg.target == "latency" else {}),
                    {**finetune, "name": "channels-ft"}]
    blocks: list[dict[str, Any]] = []
    if cand.blocks:
        blocks = [{"kind": "prune.blocks", "name": "blocks", "count": cand.blocks,
                   "scan_images": min(1000, cfg.val_size)},
                  {**finetune, "name": "blocks-ft"}]
    # the order the search walks them, so a candidate starts from the one before it
    # (shared through the model cache)
    stages = blocks + channels if cfg.blocks_first else channels + blocks
    if cand.sparsity:
        stages += [{"kind": "prune.magnitude", "name": "sparse", "ratio": cand.sparsity,
                    "scope": "global", "finetune_epochs": 0},
                   {**finetune, "name": "sparse-ft"}]
    if cfg.deploy_method == "kmeans":
        stages.append({"kind": "quant.kmeans", "name": "deploy",
                       "bits": cand.bits or cfg.kmeans_bits[0],
                       "finetune_epochs": cfg.kmeans_finetune_epochs,
                       "finetune_lr": cfg.finetune_lr})
    else:
        ptq: dict[str, Any] = {"kind": "quant.ptq", "name": "deploy", "runtime": cfg.runtime,
                               "budget_images": min(2000, cfg.val_size)}
        if cfg.budget_points > 0:
            # INT8 may spend half the budget; the whole candidate is judged on all of it
            ptq["accuracy_budget"] = cfg.budget_points / 2
        stages.append(ptq)
    return stages


def base_recipe(model: dict[str, Any], data: dict[str, Any], cfg: CompressConfig,
                device: str, split: str = "val") -> dict[str, Any]:
    """The part every candidate's recipe shares: the input model, data with a held-out
    validation split, and measurements on ``split``."""
    measure: dict[str, Any] = {"split": split, "latency": cfg.timing,
                               "batch_size": cfg.measure_batch}
    if cfg.threads is not None:
        measure["threads"] = cfg.threads
    return {"seed": 0, "device": device, "model": model,
            "data": {**data, "val_size": cfg.val_size, "calib_size": cfg.calib_size,
                     **({"augment": cfg.augment} if cfg.augment is not None else {})},
            "measure": measure, "report": {"accuracy_budget": cfg.budget_points}}


def _recipe(base: dict[str, Any], cfg: CompressConfig, cand: Candidate, name: str) -> Recipe:
    return parse_recipe({**base, "name": name, "stages": candidate_stages(cfg, cand)},
                        source=f"compress candidate {cand.name}")


class Search:
    """One search into ``out`` (see the module docstring)."""

    def __init__(self, model: dict[str, Any], data: dict[str, Any], cfg: CompressConfig,
                 out: Path, *, device: str = "cpu", log: Callable[[str], None] = print,
                 notes: list[str] | None = None, module: nn.Module | None = None,
                 before_first_write: Callable[[], None] | None = None) -> None:
        if cfg.target == "latency" and not cfg.timing:
            raise UserError("--target latency needs timing; leave out --no-timing")
        self.cfg, self.out, self.log, self.device = cfg, out, log, device
        self.name = f"compress-{out.resolve().name}"
        self.base = base_recipe(model, data, cfg, device)
        self.base_test = base_recipe(model, data, cfg, device, split="test")
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
        with owned_folder(self.out, "compress"):
            return self._run()

    def _run(self) -> CompressResult:
        check_study_folder(self.out, self.name, what="compress")
        # every candidate's recipe is valid before the first one runs
        for ratio in (0.0, *self.cfg.channel_ratios):
            _recipe(self.base, self.cfg, Candidate(ratio, 0.0), self.name)
        if self.db.exists():
            with ResultsStore(self.db, readonly=True):
                pass  # refuses a bad database before anything is written
        make_dirs(self.out)
        if self.before_first_write is not None:
            self.before_first_write()
        with ResultsStore(self.db):
            pass
        self.log(f"compress: target {self.cfg.target}, budget {self.cfg.budget_points:g} "
                 f"points of validation top-1 ({self.cfg.reserve_points:g} kept in reserve), "
                 f"at most {self._most()} candidates")
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
        return self._finish(trials)

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

    def _trial(self, cand: Candidate, trials: list[Trial]) -> Trial:
        recipe = _recipe(self.base, self.cfg, cand, f"{self.name}.{cand.name}")
        axes = {"channels": f"{cand.channels:g}", "blocks": str(cand.blocks),
                "sparsity": f"{cand.sparsity:g}"}
        if cand.bits is not None:
            axes["bits"] = str(cand.bits)
        cell = Cell(name=cand.name, axes=axes, recipe=recipe)
        self.cells.append(cell)
        self._write_record()
        k = len(trials) + 1
        with ResultsStore(self.db) as store:
            done = {c.cell: c.recipe_sha256 for c in store.cells(self.name)}
        if done.get(cell.name) == cell.recipe_sha256:
            self.log(f"candidate {k} of at most {self._most()}: {cand.name} (recorded before)")
        else:
            self.log(f"candidate {k} of at most {self._most()}: {cand.name}: running")
            run_cell(self.name, cell.name, cell.axes, recipe.model_dump(mode="json"),
                     str(self.out / CELLS_DIR / cell.name), str(self.db),
                     log=lambda line: self.log(f"  [{cand.name}] {line}"))
        trial = self._read_trial(cand)
        trials.append(trial)
        assert self.ref_top1 is not None
        best = self._best(trials)
        elapsed = (time.perf_counter() - self.started) / 60
        self.log(f"candidate {k}: {trial.describe(self.ref_top1)}; "
                 f"{'within' if trial.within else 'over'} the budget; best so far: "
                 + (best.describe(self.ref_top1) if best else "none") + f"; {elapsed:.1f} min")
        return trial

    def _read_trial(self, cand: Candidate) -> Trial:
        with ResultsStore(self.db) as store:
            rows = [r for r in store.rows(self.name) if r["cell"] == cand.name]
        baseline, deploy = rows[0], rows[-1]
        size, artifact = deploy["size_bytes"], deploy["artifact"]
        smallest = _measurement(deploy["record"]).smallest_size
        if self.cfg.target == "size" and smallest is not None and smallest != size and artifact:
            # the INT8 model's packed file loads and runs in the runtime too: the small one
            size, artifact = smallest, str(Path(artifact).with_suffix(".nspk"))
        if baseline["top1"] is None or deploy["top1"] is None:
            raise UserError(f"candidate {cand.name}: no validation top-1 was measured; "
                            "the data needs a validation split (--val-size)")
        if self.ref_top1 is None:
            self.ref_top1 = baseline["top1"]
        floor = self.ref_top1 - self.cfg.spendable_points / 100
        return Trial(candidate=cand, top1=deploy["top1"], size_bytes=size,
                     p50_ms=deploy["latency_p50_ms"], artifact=artifact,
                     within=deploy["top1"] >= floor - 1e-12)

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
                 "fine-tuned without them. Every figure below is on those images. A "
                 f"candidate counted as within the budget when it lost at most "
                 f"{self.cfg.spendable_points:g} points there (the "
                 f"{self.cfg.budget_points:g}-point budget less a reserve of "
                 f"{self.cfg.reserve_points:g} against the noise of choosing on these "
                 "images).",
                 *(n[0].upper() + n[1:].rstrip(".") + "." for n in self.notes)]
        if self.retimed:
            lines.append(
                f"Chosen by batch-1 p50 timed again side by side ({RETIME_ROUNDS} rounds "
                "round-robin, medians; the table's timings were taken minutes apart): "
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

    def _write_record(self, chosen: str | None = None, notes: list[str] | None = None
                      ) -> None:
        write_study_record(self.out, self.name, self.cells, self.db,
                           spec={"compress": self.cfg.model_dump(mode="json"),
                                 "recipe": self.base},
                           report={"accuracy_budget": self.cfg.budget_points,
                                   "baseline": "baseline"}, chosen=chosen, notes=notes)

    def _retime_side_by_side(self, trials: list[Trial]) -> None:
        """Time the candidates within the budget again, round-robin in this process, and
        keep each one's median batch-1 p50: each was timed minutes apart from the others,
        and on a shared machine that drift is larger than the differences the pick turns
        on (measured here: a 4x smaller model timed slower than the one it beat)."""
        within = [t for t in trials if t.within and t.artifact]
        if self.cfg.target != "latency" or len(within) < 2:
            return
        self.log(f"compress: timing the {len(within)} candidates within the budget side by "
                 f"side, batch 1, {RETIME_ROUNDS} rounds round-robin")
        threads = self.cfg.threads or MeasureOptions().threads
        opened = [open_model_file(self.out / CELLS_DIR / t.candidate.name / str(t.artifact),
                                  threads=threads) for t in within]
        rounds: list[list[float]] = [[] for _ in within]
        try:
            for _ in range(RETIME_ROUNDS):
                for times, model in zip(rounds, opened, strict=True):
                    one = torch.randn(1, *(model.input_shape or [1, 28, 28]))
                    times.append(time_model(model.module, one, warmup=20, runs=100,
                                            min_seconds=0.3, threads=threads,
                                            rounds=1).p50_ms)
        finally:
            for model in opened:
                model.close()
        for trial, times in zip(within, rounds, strict=True):
            trial.p50_ms = statistics.median(times)
            self.log(f"  {trial.candidate.name}: p50 {trial.p50_ms:.3f} ms")
        self.retimed = {t.candidate.name: t.p50_ms or 0.0 for t in within}

    def _finish(self, trials: list[Trial]) -> CompressResult:
        assert self.ref_top1 is not None
        self._retime_side_by_side(trials)
        result = CompressResult(out=self.out, reference_top1=self.ref_top1, trials=trials)
        # the front in three dimensions: no other candidate is as small, as fast and as
        # accurate and better in one (without timing, in size and top-1 alone)
        result.front = [t.candidate.name for t in trials
                        if not any(_dominates(o, t) for o in trials if o is not t)]
        result.chosen = self._best(trials)
        if result.chosen is None:
            self.log("compress: no candidate stays within the budget (not even the "
                     "deployment of the unpruned model); raise --budget-points")
        else:
            self.log(f"compress: chosen {result.chosen.candidate.name}; measuring it on the "
                     "test split")
            self._measure_on_test(result)
            self._write_record(chosen=result.chosen.candidate.name,
                               notes=self._split_notes(result))
        result.report = render_study_report(self.out, self.db)[0]
        return result

    def _measure_on_test(self, result: CompressResult) -> None:
        assert result.chosen is not None
        cand = result.chosen.candidate
        recipe = _recipe(self.base_test, self.cfg, cand, f"{self.name}.{CHOSEN_DIR}")
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
             log: Callable[[str], None] = print, notes: list[str] | None = None,
             module: nn.Module | None = None,
             before_first_write: Callable[[], None] | None = None) -> CompressResult:
    """Search composed methods on the model ``model`` (a recipe's model section, with
    ``weights``) for the smallest (or fastest) deployable file within the budget.

    ``module`` is the model itself when its weights file is yet to be written (by
    ``before_first_write``, called once every check has passed).

    Raises:
        UserError: bad settings, model, data or ``out`` (before anything is written).
    """
    return Search(model, data, cfg or CompressConfig(), Path(out), device=device,
                  log=log, notes=notes, module=module,
                  before_first_write=before_first_write).run()
