"""The compression search by successive halving (``search: halving``, the default).

Every structure of the space (residual blocks removed x channel ratio, x sparsity for
``size``) is pruned from the input model at once and fine-tuned briefly (rung 0: a
quarter of an epoch by default); about a third of them (``eta``) go on to the next rung,
fine-tuned longer from where they stopped (the model cache shares every rung's prefix),
and so on: many candidates judged cheaply, the few promising ones trained as long as the
best results need (the recorded best latency pick needed 8 epochs, which a walk giving
every candidate one epoch never reached). This is successive halving (Jamieson &
Talwalkar 2016; the rule of Hyperband's brackets) with a multi-objective promotion
(MO-ASHA, Schmucker et al. 2021): within a rung, the candidates the budget can still
admit (the drop widened by the recovery still to come, ``PROMOTION_SLACK``) are ranked by
Pareto fronts of validation top-1 and the target (predicted or measured latency, size),
front by front, and within a front by the target; the smallest (fastest) of those already
within the budget goes first, a hedge that keeps one sure candidate in every rung, and
rung 0 sends on the smallest (fastest) structure within half as much again as it admits,
the one that longer fine-tuning may bring within the budget.

Constraint-first (``max_latency_ms``, ``max_size_mb``, ``max_macs``, ``speedup``): the
structures predicted to break the constraint are left out before any training (the
latency model for latency, the counted MACs), and each rung promotes the most accurate
of those that meet it; the pick is the most accurate deployed file that meets it,
measured (latency re-timed side by side).

From rung 1 (INT8) or at the last rung (k-means) candidates are deployed and judged as
files: within the budget when the upper confidence bound of their drop is
(``netshrink.compress.guard``), not the point estimate. The chosen file is re-timed
side by side with the others within the budget, then run once more on the test split.

Why not Optuna: the space is a small grid (at most a few dozen structures), every point
of which rung 0 visits anyway, so a sampler has nothing to choose; Optuna's pruners are
single-objective and cannot promote by Pareto rank under a budget. The results store
keeps every candidate of every rung, and resuming replays the same decisions from it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from netshrink.compress.candidates import Candidate, search_runtime
from netshrink.compress.guard import drop_bound
from netshrink.compress.halving_time import TimeBudget
from netshrink.compress.promotion import pareto_order, with_reach
from netshrink.compress.search import CELLS_DIR, Search, Trial, _measurement
from netshrink.errors import UserError
from netshrink.study.dispatch import PoolDispatcher, RayDispatcher
from netshrink.study.execute import run_cells_dispatched

# The drop (in budgets) a rung still admits for promotion: a quarter-epoch fine-tuning
# leaves much to recover, the last rungs little.
PROMOTION_SLACK = (5.0, 2.0, 1.0, 0.5)
# Rung 0 also sends on the smallest (fastest) structure within this many times its
# admitted drop (``promotion.with_reach``).
REACH = 1.5
PREDICTION_MARGIN = 0.15  # a structure predicted within 15% of a latency bound is tried
RUNTIMES = ("onnxruntime", "openvino")
# The pick moves to the other runtime only when that is at least 10% faster side by side:
# three rounds on a shared 2-core VM differ by more than a few percent (measured: 0.315
# against 0.322 ms for files that had timed 0.17 ms apart minutes before).
SWITCH_MARGIN = 1.10
# Up to this many structures are timed whole before training (a few seconds each); a
# larger space is predicted from the block table.
WHOLE_MAX = 40


class HalvingSearch(TimeBudget, Search):
    """The search of the module docstring (the walk's ``Search`` runs and records the
    candidates, times the finalists side by side and measures the pick on test)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runtime = search_runtime(self.cfg)
        self.lut: Any = None  # the latency model, where speed is what is judged
        self.whole = False  # structures timed whole (else predicted from the block table)
        self.whole_scale = 1.0  # the unpruned model's measured latency over its probe's
        self.whole_batch_scale = 1.0  # and the same at ``measure_batch``
        self.ref_ms = 0.0  # the unpruned model's latency when the predictions were made
        self.predicted: dict[tuple[int, float, float], float] = {}
        self.predicted_batch: dict[tuple[int, float, float], float] = {}
        self.unpruned: Trial | None = None
        self.stopped_by_time = False
        self.planned = 0
        self._trials_seen: list[Trial] = []

    # -- the plan -------------------------------------------------------------------

    @property
    def _speed(self) -> bool:
        return self.cfg.judges_speed

    def _space(self) -> list[tuple[int, float, float]]:
        sparsities = [0.0, *self.cfg.sparsities] if self.cfg.for_size else [0.0]
        return [(b, c, s) for b in (0, *self.drop_blocks)
                for c in (0.0, *self.cfg.channel_ratios) for s in sparsities if b or c or s]

    def _most(self) -> int:
        return self.planned or len(self._space()) + 1

    def _deploys(self, rung: int) -> bool:
        last = len(self.cfg.rungs) - 1
        if self.cfg.deploy_method == "kmeans":
            return rung == last
        return rung >= 1 or last == 0

    def _candidate(self, structure: tuple[int, float, float], rung: int,
                   deployed: bool | None = None, bits: int | None = None) -> Candidate:
        b, c, s = structure
        runtime = self.runtime if self.cfg.int8_runtime == "auto" else None
        return Candidate(c, s, bits=bits, blocks=b, rung=rung,
                         deployed=self._deploys(rung) if deployed is None else deployed,
                         runtime=runtime if self.cfg.deploy_method == "int8" else None)

    # -- the search -----------------------------------------------------------------

    def _opening(self) -> str:
        goal = (f"the most accurate file with {self._constraint_text()}"
                if self.cfg.constraint is not None else
                f"the {'fastest' if self._speed else 'smallest'} file within "
                f"{self.cfg.budget_points:g} points of validation top-1")
        return (f"compress: successive halving for {goal} (at {self.cfg.confidence:.0%} "
                "confidence)")

    def _explore(self) -> list[Trial]:
        trials: list[Trial] = []
        self._trials_seen = trials
        self._start_unpruned(trials)
        structures = self._space()
        if self._speed or self.cfg.constraint is not None:
            built = self._build(structures, trials)
            if self._speed:
                self._start_latency_model(built, trials)
            if self.cfg.constraint is not None:
                structures = self._feasible(built)
        self.planned = len(trials) + self._plan(len(structures))
        self.log(f"compress: {len(structures)} structures at rung 0, about "
                 f"{self.planned} candidates in all over {len(self.cfg.rungs)} rungs "
                 f"(fine-tuning {', '.join(f'{e:g}' for e in self.cfg.rungs)} epochs)")
        alive = [self._candidate(st, 0) for st in structures]
        for rung in range(len(self.cfg.rungs)):
            done = self._run_rung(rung, alive, trials)
            if rung == len(self.cfg.rungs) - 1 or not done or self.stopped_by_time:
                break
            promoted = self._promote(rung, done)
            self.log(f"compress: rung {rung} -> {rung + 1}: "
                     + (", ".join(t.candidate.name for t in promoted) or "none promoted"))
            alive = [self._candidate(t.candidate.structure, rung + 1) for t in promoted]
            if not alive:
                break
        return trials

    def _plan(self, n: int) -> int:
        """About how many candidates the rungs run from ``n`` structures."""
        total = 0
        for _ in self.cfg.rungs:
            total += n
            n = min(n, max(2, math.ceil(n / self.cfg.eta)))
        return total

    def _start_unpruned(self, trials: list[Trial]) -> None:
        """The input model deployed unpruned (on both runtimes with ``runtime auto``,
        keeping the faster): the fallback pick, the reference of a speed-up, and the
        latency model's calibration."""
        if self.cfg.int8_runtime == "auto":
            both = [self._trial(Candidate(0.0, 0.0, rung=0, runtime=rt), trials,
                                label=f"unpruned on {rt}") for rt in RUNTIMES]
            self.retime(both, rounds=3)
            fast, slow = sorted(both, key=lambda t: t.p50_ms or math.inf)
            self.runtime = str(fast.candidate.runtime)
            self.unpruned = fast
            self.notes.append(
                f"runtime auto: the unpruned model's INT8 ran batch 1 in "
                f"{fast.p50_ms:.3f} ms on {fast.candidate.runtime} and "
                f"{slow.p50_ms:.3f} ms on {slow.candidate.runtime}, timed side by side: the "
                f"search deployed on {self.runtime}")
        elif self.cfg.deploy_method == "kmeans" and self.cfg.constraint is None:
            # the smallest file is never the unpruned one, and k-means on the whole model
            # costs a fine-tuning epoch of the whole model per width tried (14 minutes of a
            # shared 2-core machine for the quickstart student at 4 bits)
            self.log("compress: the unpruned model is not deployed (a size search picks "
                     "from the pruned structures)")
        else:
            self.unpruned = self._deploy_widths((0, 0.0, 0.0), 0, trials, "unpruned")

    def _build(self, structures: list[tuple[int, float, float]], trials: list[Trial]
               ) -> dict[tuple[int, float, float], Trial]:
        """Every structure pruned from the input model, not yet fine-tuned (the first
        stages of its rung-0 candidate, shared through the model cache): what the latency
        model predicts and a constraint is judged on, before any training."""
        built = {}
        for k, st in enumerate(structures, 1):
            t = self._trial(self._candidate(st, -1, deployed=False), trials,
                            label=f"structure {k} of {len(structures)} (pruned, not trained)")
            trials.remove(t)  # a structure before training is no candidate
            built[st] = t
        return built

    def _start_latency_model(self, built: dict[tuple[int, float, float], Trial],
                             trials: list[Trial]) -> None:
        """Every structure's batch-1 latency on the search's runtime, before training.

        Up to ``WHOLE_MAX`` structures (the default spaces) are timed whole, deployed
        untrained (latency does not depend on the weights), round-robin with the unpruned
        model, and scaled by the unpruned model's measured latency over its own probe
        timing: exact up to noise, where a per-unit sum missed OpenVINO's batch-1 latency
        by a median 55% (kernels chosen by width, fusion across blocks). Larger spaces
        use the block table (NetAdapt's lookup table, ``latency_model``) with scale and
        overhead fitted on the unpruned model and the most pruned structure, deployed
        untrained and timed side by side."""
        from netshrink.compress.latency_model import LatencyModel

        assert self.unpruned is not None
        if not self.unpruned.p50_ms:
            raise UserError("compress: the unpruned model's latency was not measured; "
                            "latency needs timing (leave out --no-timing)")
        self.lut = LatencyModel(self.runtime, precision="int8",
                                threads=self.cfg.timing_threads, log=self.log)
        modules = {st: self._module_of(t) for st, t in built.items()}
        unpruned = self._module_of(self.unpruned)
        self.whole = len(built) <= WHOLE_MAX
        if self.whole:
            ms = self.lut.whole_ms([unpruned, *modules.values()])
            self.whole_scale = self.unpruned.p50_ms / ms[0]
            self.log(f"compress: the unpruned model timed {ms[0]:.3f} ms (fastest call) "
                     f"as a probe, {self.unpruned.p50_ms:.3f} ms deployed: structures scaled by "
                     f"{self.whole_scale:.3f}")
            if self.cfg.ranks_batch_too and self.unpruned.batch_ms:
                batch = self.cfg.measure_batch
                ms_n = self.lut.whole_ms([unpruned, *modules.values()], batch=batch)
                self.whole_batch_scale = self.unpruned.batch_ms / ms_n[0]
                for st, one in zip(modules, ms_n[1:], strict=True):
                    self.predicted_batch[st] = one * self.whole_batch_scale
        else:
            self.lut.prepare([unpruned, *modules.values()])
            refs = [self.unpruned]
            if built:
                most = max(built, key=lambda st: (st[0], st[1], st[2]))
                anchor = self._trial(self._candidate(most, -1, deployed=True), trials,
                                     label="latency anchor (the most pruned structure, "
                                           "untrained)")
                trials.remove(anchor)  # timed only, never a candidate
                if anchor.p50_ms:
                    self.retime([self.unpruned, anchor], rounds=3)
                    refs.append(anchor)
            self.lut.fit([(*self._module_of(t), t.p50_ms) for t in refs])
        predicted = self._predict(list(modules.values()))
        self.ref_ms = self.unpruned.p50_ms  # what the predictions were scaled to
        for (st, t), ms_ in zip(built.items(), predicted, strict=True):
            self.predicted[st] = t.predicted_ms = ms_
            t.predicted_batch_ms = self.predicted_batch.get(st)
        self.log("compress: latency predicted (ms, batch 1): " + ", ".join(
            f"{t.candidate.name.split('-r')[0]} {t.predicted_ms:.3f}" for t in built.values()))
        if self.predicted_batch:
            self.log(f"compress: throughput predicted (img/s, batch {self.cfg.measure_batch}"
                     "): " + ", ".join(
                         f"{t.candidate.name.split('-r')[0]} "
                         f"{self.cfg.measure_batch * 1000 / t.predicted_batch_ms:,.0f}"
                         for t in built.values() if t.predicted_batch_ms))

    def _predict(self, modules: list[tuple[Any, list[int]]]) -> list[float]:
        """The predicted batch-1 ms of each ``(module, input_shape)``: timed whole and
        scaled, or from the block table (see ``_start_latency_model``)."""
        if self.whole:
            return [ms * self.whole_scale for ms in self.lut.whole_ms(modules)]
        return [self.lut.predict_ms(m, shape) for m, shape in modules]

    def _feasible(self, built: dict[tuple[int, float, float], Trial]
                  ) -> list[tuple[int, float, float]]:
        """Constraint-first: the structures that may meet the constraint (predicted
        latency within ``PREDICTION_MARGIN`` of the bound, counted MACs, estimated
        size)."""
        keep = [st for st, t in built.items() if self._meets(t) or self._near(t)]
        self.log(f"compress: {len(keep)} of {len(built)} structures may meet "
                 f"{self._constraint_text()}")
        if not keep:
            self.log("compress: no pruned structure is predicted to meet the constraint")
        return keep

    def _run_rung(self, rung: int, cands: list[Candidate], trials: list[Trial]
                  ) -> list[Trial]:
        if self.cfg.deploy_method == "kmeans" and self._deploys(rung):
            done = []
            for k, cand in enumerate(cands, 1):
                if self._out_of_time(rung):
                    break
                t = self._deploy_widths(cand.structure, rung, trials,
                                        f"rung {rung}: candidate {k} of {len(cands)}")
                done.append(t)
            return done
        if self.cfg.workers > 1:
            return self._run_parallel(rung, cands, trials)
        done = []
        for k, cand in enumerate(cands, 1):
            if self._out_of_time(rung):
                break
            done.append(self._trial(
                cand, trials, label=f"rung {rung}: candidate {k} of {len(cands)}"))
            self.log(self._progress(rung, len(cands) - k))
        return done

    def _run_parallel(self, rung: int, cands: list[Candidate], trials: list[Trial]
                      ) -> list[Trial]:
        cells = [self._cell(c) for c in cands]
        todo = [c for c in cells if not self._recorded(c)]
        self.log(f"rung {rung}: {len(cands)} candidates, {len(todo)} to run on "
                 f"{self.cfg.workers} {self.cfg.executor} workers")
        if todo:
            dispatcher = (PoolDispatcher(self.cfg.workers) if self.cfg.executor == "local"
                          else RayDispatcher(self.cfg.workers, None))
            failed = run_cells_dispatched(self.name, tuple(cells), todo, self.out, self.db,
                                          dispatcher, self.log)
            if failed:
                name, why = next(iter(failed.items()))
                raise UserError(f"compress: candidate {name} failed: {why}")
        done = []
        for cand in cands:
            t = self._judge(self._read_trial(cand))
            trials.append(t)
            done.append(t)
        return done

    def _deploy_widths(self, structure: tuple[int, float, float], rung: int,
                       trials: list[Trial], label: str) -> Trial:
        """Deploy ``structure``; with k-means the narrowest width (from the narrowest
        any structure needed) that keeps the budget. The last deployment tried."""
        if self.cfg.deploy_method != "kmeans":
            return self._trial(self._candidate(structure, rung, True), trials, label=label)
        held = [t.candidate.bits for t in trials if t.within and t.candidate.bits]
        widths = [b for b in self.cfg.kmeans_bits if b >= min(held, default=0)]
        trial = None
        for bits in widths:
            trial = self._trial(self._candidate(structure, rung, True, bits=bits), trials,
                                label=label)
            if trial.within:
                break
        assert trial is not None
        return trial

    def _judge(self, trial: Trial) -> Trial:
        """``trial`` judged as halving judges: a deployed file within the budget by the
        upper confidence bound of its drop; a float model never (it is not deployable);
        its latency predicted from its structure."""
        if self.ref_accuracy is not None and trial.accuracy is not None:
            est = drop_bound(self.ref_accuracy, trial.accuracy, self.cfg.confidence)
            trial.upper_points = est.upper_points
        deployed = trial.candidate.deployed
        trial.within = bool(deployed and trial.upper_points is not None
                            and trial.upper_points <= self.cfg.budget_points + 1e-9)
        if self.lut is not None and trial.candidate.pruned:
            st = trial.candidate.structure
            if st not in self.predicted:
                self.predicted[st] = self._predict([self._module_of(trial)])[0]
            trial.predicted_ms = self.predicted[st]
            trial.predicted_batch_ms = self.predicted_batch.get(st)
        elif self.lut is not None and self.unpruned is not None:
            trial.predicted_ms = self.unpruned.p50_ms
            trial.predicted_batch_ms = self.unpruned.batch_ms
        return trial

    def _module_of(self, trial: Trial) -> tuple[Any, list[int]]:
        """The torch model of ``trial``'s structure (its last float stage) and the
        shape of one image."""
        from netshrink.models.factory import trusting
        from netshrink.store.checkpoint import load_model
        from netshrink.study.results import ResultsStore

        with ResultsStore(self.db) as store:
            rows = [r for r in store.rows(self.name) if r["cell"] == trial.candidate.name]
        floats = [r for r in rows if r["artifact"]
                  and Path(r["artifact"]).suffix in (".safetensors", ".pth", ".pt")]
        if not floats:
            raise UserError(f"compress: candidate {trial.candidate.name} left no float "
                            "model file to predict its latency from")
        path = self.out / CELLS_DIR / trial.candidate.name / floats[-1]["artifact"]
        factory = self.base["model"].get("factory")
        with trusting([factory] if factory else []):
            module, _, _ = load_model(path)
        return module, list(_measurement(rows[-1]["record"]).input_shape)

    # -- promotion and choice ---------------------------------------------------------

    def _limit(self) -> float:
        """The constraint's bound in the units ``_value`` gives."""
        assert self.cfg.constraint is not None
        kind, bound = self.cfg.constraint
        if kind == "speedup":
            assert self.unpruned is not None and self.unpruned.p50_ms
            return self.unpruned.p50_ms / bound
        return bound * 1e6 if kind == "size_mb" else bound

    def _value(self, trial: Trial) -> float | None:
        """What the constraint (or the target) bounds of ``trial``: batch-1 ms (measured
        when deployed, else predicted; with ``speed both`` and no constraint, its
        geometric mean with the batch call's ms an image), bytes (deployed, else an
        estimate: its non-zero parameters at the deployment's bits per weight, and a
        sparse model's mask of a bit per weight), or MACs."""
        c = self.cfg.constraint
        kind = c[0] if c else ("latency_ms" if self.cfg.target == "latency" else "size_mb")
        if kind in ("latency_ms", "speedup"):
            measured = trial.candidate.deployed and trial.p50_ms
            one = trial.p50_ms if measured else trial.predicted_ms
            many = trial.batch_ms if measured else trial.predicted_batch_ms
            if self.cfg.ranks_batch_too and one and many:
                # a product: the ranking does not depend on how the two are weighed
                return math.sqrt(one * many / self.cfg.measure_batch)
            return one
        if kind == "macs":
            return trial.macs
        if trial.candidate.deployed and trial.size_bytes:
            return trial.size_bytes
        per_weight = (min(self.cfg.kmeans_bits) / 8 if self.cfg.deploy_method == "kmeans"
                      else 1.0)
        nonzero = trial.nonzero_params or 0
        # the packed format keeps a sparse tensor's zeros as a bitmask: without it a
        # full-width model at 75% sparsity looked as small as one with half its
        # channels and no zeros, and cost four times its fine-tuning
        mask = (trial.params or 0) / 8 if nonzero < (trial.params or 0) else 0.0
        return nonzero * per_weight + mask

    def _meets(self, trial: Trial) -> bool:
        value = self._value(trial)
        return value is not None and value <= self._limit() * (1 + 1e-9)

    def _near(self, trial: Trial) -> bool:
        """Just over a latency bound (within ``PREDICTION_MARGIN``): may meet it when
        timed side by side at the end."""
        assert self.cfg.constraint is not None
        value = self._value(trial)
        return (self.cfg.constraint[0] in ("latency_ms", "speedup") and value is not None
                and value <= self._limit() * (1 + PREDICTION_MARGIN))

    def _constraint_text(self) -> str:
        assert self.cfg.constraint is not None
        kind, bound = self.cfg.constraint
        return {"latency_ms": f"batch-1 p50 <= {bound:g} ms on {self.runtime}",
                "speedup": f"a {bound:g}x batch-1 speed-up over the unpruned INT8 model "
                           f"on {self.runtime}" + (
                               f" (<= {self._limit():.3f} ms)"
                               if self.unpruned is not None and self.unpruned.p50_ms else ""),
                "size_mb": f"<= {bound:g} MB on disk",
                "macs": f"<= {bound:,.0f} MACs an image"}[kind]

    def _promote(self, rung: int, done: list[Trial]) -> list[Trial]:
        quota = min(len(done), max(2, math.ceil(len(done) / self.cfg.eta)))
        timed = [t for t in done if t.candidate.deployed and t.artifact and t.p50_ms]
        if self._speed and len(timed) >= 2:
            # each was timed right after it was made, minutes apart; the ranking turns
            # on differences smaller than that drift (a structure 15% faster when timed
            # whole measured 2% slower after deployment, and lost its place)
            self.log(f"compress: rung {rung}: its {len(timed)} files timed side by side "
                     "before promotion")
            self.retime(timed, rounds=3)
            if self.cfg.ranks_batch_too:
                self.retime(timed, rounds=3, batch=self.cfg.measure_batch)
        if self.cfg.constraint is not None:
            # those that meet the bound first, then those just over it (latency): this
            # VM's speed drifts by a third between timings minutes apart (a pick timed
            # 0.267 ms in its rung, 0.134 ms side by side at the end), and a 0.15 ms
            # search that promoted only those meeting it sent none to its last rung
            meets = sorted((t for t in done if self._meets(t)), key=lambda t: -t.top1)
            near = sorted((t for t in done if not self._meets(t) and self._near(t)),
                          key=lambda t: -t.top1)
            ranked = meets + near
        else:
            slack = PROMOTION_SLACK[min(rung, len(PROMOTION_SLACK) - 1)]
            admit = self.cfg.budget_points * (1 + slack)
            ranked = pareto_order([t for t in done if t.drop_points <= admit],
                                   key=lambda t: self._value(t) or math.inf)
            # a hedge: the smallest (fastest) of those already within the budget goes on
            # first, so that the next rung holds one that more fine-tuning only has to
            # keep there. Without it a size search sent its two smallest structures, 1.1
            # and 1.5 points down, to the last rung, and neither ended within the budget.
            safe = [t for t in ranked if t.upper_points is not None
                    and t.upper_points <= self.cfg.budget_points + 1e-9]
            if safe:
                hedge = min(safe, key=lambda t: self._value(t) or math.inf)
                ranked = [hedge, *(t for t in ranked if t is not hedge)]
            if rung == 0:
                ranked = with_reach(ranked, done, admit * REACH,
                                    key=lambda t: self._value(t) or math.inf)
        return ranked[: self._affordable(rung + 1, quota)]

    def _best(self, trials: list[Trial]) -> Trial | None:
        deployed = [t for t in trials if t.candidate.deployed]
        if self.cfg.constraint is not None:
            meets = [t for t in deployed if self._meets(t)]
            return max(meets, key=lambda t: (t.top1, -(self._value(t) or 0)), default=None)
        within = [t for t in deployed if t.within]
        if self._speed:
            within = [t for t in within if t.p50_ms]
        return min(within, key=lambda t: self._value(t) or math.inf, default=None)

    def _to_retime(self, trials: list[Trial]) -> list[Trial]:
        """The files timed again side by side before choosing: those within the budget
        (or near the latency bound) and the unpruned one."""
        if not self._speed:
            return []
        deployed = [t for t in trials if t.candidate.deployed and t.artifact]
        if self.cfg.constraint is not None:
            near = [t for t in deployed
                    if (t.p50_ms or math.inf) <= self._limit() * (1 + 2 * PREDICTION_MARGIN)]
        else:
            near = [t for t in deployed if t.within]
        if self.unpruned is not None and self.unpruned not in near:
            near.append(self.unpruned)
        return near

    def _choose(self, trials: list[Trial]) -> Trial | None:
        """The best; with ``runtime auto`` a pruned pick is deployed on the other runtime
        too, the two timed side by side at batch 1 and at ``measure_batch``, and the
        other kept only when it is faster at batch 1 and holds the throughput."""
        best = self._best(trials)
        if best is None or self.cfg.int8_runtime != "auto" or not best.candidate.pruned:
            return best
        other = next(rt for rt in RUNTIMES if rt != best.candidate.runtime)
        twin = self._trial(replace(best.candidate, runtime=other), trials,
                           label=f"the pick on {other}")
        pair = [best, twin]
        self.retime(pair, rounds=3)
        batch = self.cfg.measure_batch
        rate = [batch * 1000 / ms for ms in self.retime(pair, rounds=3, batch=batch)]
        # a runtime 10% quicker at batch 1 lost 40% of the batch-32 throughput on the
        # quickstart's pick (ONNX Runtime 31,000 img/s, OpenVINO 50,700): a switch must
        # hold both
        quicker = (twin.p50_ms or math.inf) * SWITCH_MARGIN <= (best.p50_ms or 0)
        holds = rate[1] * SWITCH_MARGIN >= rate[0]
        keep = twin if quicker and holds else best
        self.notes.append(
            f"runtime auto: the pick's INT8 ran batch 1 in {best.p50_ms:.3f} ms on "
            f"{best.candidate.runtime} and {twin.p50_ms:.3f} ms on {other}, batch {batch} "
            f"at {rate[0]:,.0f} and {rate[1]:,.0f} img/s, timed side by side (a switch needs "
            f"{SWITCH_MARGIN - 1:.0%} at batch 1, and at most {SWITCH_MARGIN - 1:.0%} less "
            f"throughput): kept {keep.candidate.runtime}")
        if keep is twin and not (twin.within or self.cfg.constraint is not None):
            return best  # INT8 on the other runtime lost more than the budget
        return keep

    def _none_chosen(self) -> str:
        if self.cfg.constraint is None:
            return super()._none_chosen()
        return (f"no deployed candidate meets {self._constraint_text()}; loosen "
                "it, or allow deeper pruning (--channel-ratios, --drop-blocks)")

    def _retime_side_by_side(self, trials: list[Trial]) -> None:
        super()._retime_side_by_side(trials)
        near = [t for t in self._to_retime(trials) if t.candidate.name in self.retimed]
        if self.cfg.ranks_batch_too and len(near) >= 2:
            self.log(f"compress: and at batch {self.cfg.measure_batch}")
            self.retime(near, 3, batch=self.cfg.measure_batch)
            self.notes.append(
                f"speed judged as the geometric mean of the batch-1 p50 and the time an "
                f"image of a batch-{self.cfg.measure_batch} call (speed both), each timed "
                "side by side")
        self._latency_note(trials)

    def _latency_note(self, trials: list[Trial]) -> None:
        """The latency model's error (``prediction_errors``): against every built
        candidate as timed when it was made, and as a ratio to the unpruned model over
        the files timed side by side with it at the end."""
        from netshrink.compress.latency_model import prediction_errors

        made = [(t.predicted_ms, t.p50_ms) for t in trials
                if t.candidate.deployed and t.candidate.pruned and t.predicted_ms
                and t.p50_ms]
        if not made:
            return
        base = self.retimed.get(self.unpruned.candidate.name) if self.unpruned else None
        alongside = [(t.predicted_ms, self.retimed[t.candidate.name]) for t in trials
                     if t.candidate.name in self.retimed and t.candidate.pruned
                     and t.predicted_ms]
        how = ("every structure timed whole, untrained, scaled by the unpruned model"
               if self.whole else "block table fitted on the unpruned model and the most "
               "pruned structure")
        self.notes.append(f"latency model ({self.runtime}, {how}): " + prediction_errors(
            made, alongside, self.ref_ms, base))  # type: ignore[arg-type]
