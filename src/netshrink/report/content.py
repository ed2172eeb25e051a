"""Everything a report says, derived from a :class:`RunRecord` and what was read beside it.

Both renderers (Markdown and HTML) take a :class:`ReportContent`, so the two files
cannot disagree, and nothing here reads the clock or the disk: the caller reads
``run.json`` and the stage files (:func:`netshrink.report.stage_files.load_run_files`),
and the same inputs always give the same report.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

import yaml

from netshrink.bench.load import load_differs
from netshrink.bench.schema import Measurement
from netshrink.report import fmt
from netshrink.report.layer_tables import layer_tables
from netshrink.report.lineage import stage_inputs
from netshrink.report.plots import Plot, all_plots
from netshrink.report.prune_plots import pruning_plots
from netshrink.report.stage_files import RunFiles
from netshrink.report.tables import (
    EnvironmentSummary,
    Table,
    comparison_table,
    device_label,
    environment_summary,
    history_table,
    measurement_table,
)
from netshrink.report.verdict import (
    FASTER,
    NOT_FASTER,
    NOT_RELIABLE,
    SLOWER,
    Comparison,
    Reference,
    SpeedJudgement,
    SpeedSplit,
    accuracy_budget,
    compare_all,
    measurement_on,
    reference_stage,
    side_by_side_stages,
    thresholds_text,
)
from netshrink.stages.record import RunRecord, SideBySide, StageRecord

LAYER_HEADING = "Per-layer pruning"


@dataclass(frozen=True)
class ReportContent:
    """The report, format-free: strings, tables and PNG plots."""

    title: str
    meta: tuple[tuple[str, str], ...]  # (label, value) lines under the title
    headline: str  # the one-sentence verdict on the final stage
    notes: tuple[str, ...]  # warnings and thresholds, shown right after the headline
    comparison: Table
    measurement: Table
    environment: EnvironmentSummary
    histories: tuple[Table, ...]
    layer_tables: tuple[Table, ...]  # per-layer sparsity / channels of pruning stages
    stage_notes: tuple[tuple[str, tuple[str, ...]], ...]  # (stage, notes) with notes
    plots: tuple[Plot, ...]
    recipe_text: str
    # A line above everything else, right under the title (a compress search's headline:
    # its test figure first); None: none.
    lead: str | None = None


def _ordered(record: RunRecord) -> list[StageRecord]:
    """Stages by index; the baseline (index 0) first even if written out of order."""
    return sorted(record.stages, key=lambda s: s.index)


def _size_words(r: float) -> str:
    return f"{fmt.times(r)} smaller" if r >= 1 else f"{fmt.times(1 / r)} larger"


def _speed_words(r: float) -> str:
    return f"{fmt.times(r)} faster" if r >= 1 else f"{fmt.times(1 / r)} slower"


def _undecided(j: SpeedJudgement) -> str:
    """A speed judgement that is not "faster"/"slower", in words with its figures; a noisy
    one names its noisy timings, and the notes say why each was (once, for the report)."""
    if j.word == NOT_FASTER:
        return (f"not faster (latency {fmt.ratio(j.speedup)}, throughput "
                f"{fmt.ratio(j.throughput_ratio)})")
    if j.word == NOT_RELIABLE:
        return f"speed not measured reliably (noisy timing: {j.noisy_timings()})"
    return j.word


def _decided(j: SpeedJudgement) -> bool:
    return j.word in (FASTER, SLOWER) and j.speedup is not None


def _across_runtimes(split: SpeedSplit, ref: str) -> str:
    """The speed of a stage in another runtime than the reference: at equal runtime (the
    compression's) and the runtime's own, never one mixed figure as the compression's.
    Every figure here names the two runtimes; one from a noisy timing is not given."""
    j, rt = split.overall, f"{split.stage_runtime} vs {split.reference_runtime}"
    if split.is_variant:
        said = _speed_words(j.speedup) if _decided(j) and j.speedup else _undecided(j)
        return (f"the same model in {split.stage_runtime}: {said} than {ref} in "
                f"{split.reference_runtime}, all of it from the runtime")
    if split.equal is None or split.same_runtime is None:
        said = (f"{_speed_words(j.speedup)} than {ref}" if _decided(j) and j.speedup
                else _undecided(j))
        return (f"{said} across runtimes ({rt}), but no stage runs {ref}'s model in "
                f"{split.stage_runtime}, so how much of it the compression gave is unknown")
    eq, same = split.equal, split.same_runtime.name
    where = f"{same} ({ref} in {split.stage_runtime})"
    if _decided(eq) and eq.speedup is not None:
        said = f"{_speed_words(eq.speedup)} than {where} at equal runtime (compression)"
    else:
        said = f"at equal runtime against {where}: {_undecided(eq)}"
    in_all = f", {fmt.times(j.speedup)} in all" if j.speedup is not None else ""
    runtime = split.runtime
    if runtime is not None and runtime.speedup is not None:
        more = "more " if runtime.speedup >= 1 else ""
        said += (f"; ×{fmt.times(runtime.speedup).removesuffix('x')} {more}from the runtime "
                 f"({rt})")
        if runtime.word == NOT_RELIABLE:
            said += ", not measured reliably"
        said += in_all
    elif j.speedup is not None:  # the runtime's share rests on a noisy timing; the whole not
        said += (f"; {fmt.times(j.speedup)} in all across runtimes ({rt}), the runtime's "
                 "share not measured")
    else:
        noisy = f" (noisy timing: {j.noisy_timings()})" if j.noise else ""
        said += f"; across runtimes ({rt}) not measured{noisy}"
    return said


def _headline(
    stages: list[StageRecord], comparisons: list[Comparison], reference: Reference | None,
    timed: Collection[str] = (),
) -> str:
    """``Final stage X: 3.9x smaller, 2.1x faster than train, -0.40 points top-1 … (verdict: …)``.

    Speaks of the last stage after the reference that finished with a measurement: that
    is the model the run produced. A failed or unmeasured stage after it is said first,
    so it is not missed. "faster" is said only where the verdict says it (latency and
    throughput agree, neither noisy); a stage in another runtime than the reference gets
    its speed at equal runtime (the compression's) apart from the runtime's own. A speed
    figure says which runtimes it compares and where it comes from: the files ``timed``
    side by side at the end of the run, or each stage's own timing (minutes apart, and
    under which loads).
    """
    if reference is None:
        return "No stages recorded yet: the run has not measured its baseline."
    ref = reference.stage.name
    measured = [i for i, s in enumerate(stages)
                if i > reference.position and s.status == "done" and s.measurement]
    prefix = ""
    if stages[-1].status == "failed":
        prefix = f"Stage {stages[-1].name} failed (see its notes). "
    if not measured:
        return prefix + f"No stage after the reference ({ref}) has been measured yet."
    i = measured[-1]
    final, cmp = stages[i], comparisons[i]
    split = cmp.speed
    timed_both = split is not None and split.overall.timed
    ratios = []
    if cmp.size_ratio is not None:
        ratios.append(_size_words(cmp.size_ratio))
    speed = ""
    if split is not None and timed_both:
        if split.other_runtime:
            speed = _across_runtimes(split, ref)
        elif _decided(split.overall) and split.overall.speedup is not None:
            ratios.append(_speed_words(split.overall.speedup))
        else:
            speed = _undecided(split.overall)
    parts = [f"{', '.join(ratios)} than {ref}"] if ratios else []
    if speed:
        parts.append(speed)
    if cmp.top1_delta is not None:
        parts.append(f"{fmt.points(cmp.top1_delta)} points top-1"
                     + ("" if parts else f" against {ref}"))
    said = (("; " if split is not None and split.other_runtime else ", ").join(parts)
            if parts else f"nothing comparable to {ref} was measured")
    source = (_speed_source(final, reference.stage, split, timed)
              if split is not None and timed_both else "")
    label = "Final stage" if i == len(stages) - 1 else "Last measured stage"
    return f"{prefix}{label} {final.name}: {said} (verdict: {cmp.verdict}{source})."


def _speed_source(stage: StageRecord, reference: StageRecord, split: SpeedSplit,
                  timed: Collection[str]) -> str:
    """What a headline's speed figure compares and where it comes from, for the end of
    its verdict: ``; speed: both in eager torch, timed side by side at the end of the run``
    (a stage in another runtime has both runtimes named with its figures already)."""
    where = [] if split.other_runtime else [f"both in {split.stage_runtime}"]
    m, b = stage.measurement, reference.measurement
    if m is not None and b is not None and m.environment.device != b.environment.device:
        # against the reference's timing on the stage's device (measure.also_cpu)
        where.append(f"on the {device_label(m.environment.device)}")
    runtimes = f"speed: {' '.join(where)}," if where else "speed"
    if stage.name in timed and reference.name in timed:
        return f"; {runtimes} timed side by side at the end of the run"
    why = _other_conditions(m, b) if m is not None and b is not None else None
    taken = (", taken on different machines" if why == OTHER_MACHINE else
             ", taken under different CPU loads" if why else "")
    return f"; {runtimes} from each stage's own timing{taken}, not side by side"


OTHER_MACHINE = "timed on another machine than the reference"


def _other_conditions(m: Measurement, reference: Measurement) -> str | None:
    """Why ``m`` was timed under other conditions than ``reference`` (another machine,
    another CPU load), in words; None when it was not."""
    if m.environment.cpu != reference.environment.cpu:
        return OTHER_MACHINE
    return load_differs(m.load, reference.load)


def _timing_notes(record: RunRecord, stages: list[StageRecord],
                  reference: Reference | None, timed: Collection[str]) -> list[str]:
    """Where the ratios come from, and every stage timed under another load or on
    another machine than the reference."""
    sbs = record.side_by_side
    notes = []
    if sbs is not None and timed:
        notes.append(
            f"Speed ratios come from the files of {len(timed)} stages timed side by side at "
            f"the end of the run ({sbs.timed}): {sbs.rounds} rounds round-robin in one "
            f"process, {sbs.threads} threads, on {sbs.cpu}; CPU-load calibration "
            f"{sbs.load_before.calibration_ms:.2f} ms before and "
            f"{sbs.load_after.calibration_ms:.2f} ms after. The latency and throughput "
            "columns are each stage's own timing, taken right after it was made.")
    elif any(s.measurement is not None and s.measurement.latency is not None for s in stages):
        notes.append("Speed ratios come from each stage's own timing, taken right after it "
                     "was made, minutes apart (the run's files were not timed side by side "
                     "at its end: an interrupted run, or measure.latency off since).")
    if reference is None or reference.stage.measurement is None:
        return notes
    ref = reference.stage.measurement
    marked = []
    for s in stages:
        m = s.measurement
        if s is reference.stage or m is None or m.latency is None:
            continue
        why = _other_conditions(m, ref)
        if why:
            then = ("its ratios come from the side-by-side timing"
                    if s.name in timed and reference.stage.name in timed
                    else "its ratios against the reference are not like for like")
            marked.append(f"{s.name} {why}: {then}")
    if marked:
        notes.append("Timed under other conditions than the reference: " + "; ".join(marked)
                     + ".")
    return notes


def _noise_notes(stages: list[StageRecord], side_by_side: SideBySide | None) -> list[str]:
    """Name every timing too unsteady to compare, with why: the one place the reasons
    are given (the tables and plots only say "not measured" / leave the point out)."""
    noisy = [f"{s.name} ({device_label(m.environment.device)}) {what}"
             for s in stages
             for m in (s.measurement, s.cpu_measurement) if m is not None
             for what in m.noise()]
    for t in side_by_side.stages if side_by_side is not None else ():
        noisy += [f"{t.stage} side by side {what}: {reason}"
                  for what, lat in (("latency", t.latency), ("throughput", t.throughput))
                  if lat is not None and (reason := lat.noise_reason()) is not None]
    if not noisy:
        return []
    return ["Noisy timings (another job on the machine, a thermal or power change): "
            + "; ".join(noisy) + ". No figure is taken from them: the tables say \"not "
            "measured\" where one would be, the latency plots leave those points out, and a "
            "speed verdict resting on one says \"not measured reliably\"; measure again on "
            "a quiet machine."]


def _runtime_notes(stages: list[StageRecord], comparisons: list[Comparison],
                   reference: Reference | None) -> list[str]:
    """Say, for stages in another runtime than the reference, what their speed is against."""
    if reference is None:
        return []
    ref = reference.stage.name
    judged, unmatched = [], []
    for s, cmp in zip(stages, comparisons, strict=True):
        split = cmp.speed
        if s is reference.stage or split is None or not split.other_runtime:
            continue
        if split.is_variant:
            judged.append(f"{s.name} is {ref} in {split.stage_runtime}")
        elif split.same_runtime is not None:
            judged.append(f"{s.name} against {split.same_runtime.name}")
        else:
            unmatched.append(f"{s.name} ({split.stage_runtime})")
    notes = []
    if judged:
        notes.append(
            f"Stages in another runtime than {ref} are judged at equal runtime, against "
            f"{ref}'s model in their runtime: {', '.join(judged)}. Their speed brackets "
            "read overall = at equal runtime (the compression's) × runtime (what the "
            "runtime alone gave).")
    if unmatched:
        notes.append(
            f"No stage runs {ref}'s model in the runtime of {', '.join(unmatched)}: their "
            "speed-ups mix the runtime's gain with the compression's (add an export of "
            f"{ref} in that runtime to the recipe to separate them).")
    return notes


def _like_for_like_notes(stages: list[StageRecord], reference: Reference | None) -> list[str]:
    """Warn where a stage was timed on other hardware or threads than the reference.

    Stages with nothing timed (an untrained start is only counted and sized) have no
    speed to compare, so nothing to warn about.
    """
    if reference is None or reference.stage.measurement is None:
        return []
    ref = reference.stage.name
    notes = []
    for s in stages:
        m = s.measurement
        if s is reference.stage or m is None or (
            m.latency is None and m.throughput is None and m.peak_memory_mb is None
        ):
            continue
        env = m.environment
        # The reference's timing on this stage's device (its CPU timing, with also_cpu).
        same = measurement_on(reference.stage, env.device) or reference.stage.measurement
        base = same.environment
        changed = [
            name
            for name, a, b in (
                ("cpu", base.cpu, env.cpu),
                ("gpu", base.gpu, env.gpu),
                ("device", base.device, env.device),
                ("threads", base.threads, env.threads),
            )
            if a != b
        ]
        if "device" in changed:
            notes.append(
                f"{s.name} was measured on {env.device}, the reference ({ref}) on "
                f"{base.device}: its speed is shown in the other device's columns, with no "
                "ratio."
            )
        elif changed:
            notes.append(
                f"{s.name} was measured with a different {', '.join(changed)} than the "
                f"reference ({ref}): its speed ratios are not like-for-like."
            )
    return notes


# What a reader needs to judge the timings at a glance; the rest is in the Environment part.
_AT_A_GLANCE = ("cpu", "gpu", "threads", "torch", "runtime", "precision")


def _measured_on(env: EnvironmentSummary) -> str:
    """``Measured on: cpu …, gpu none, threads 2, …`` for the fields every stage shares."""
    common = dict(env.common)
    shared = [f"{k} {common[k]}" for k in _AT_A_GLANCE if k in common]
    differing = [k for k in _AT_A_GLANCE if k not in common]
    if not env.common and env.per_stage is None:
        return "No stage has a measurement yet."
    if not shared:
        return "Measured on: see Environment (no field is the same for every stage)."
    text = f"Measured on (every stage): {', '.join(shared)}."
    if env.per_stage is not None and differing:
        text += f" Differs per stage: {', '.join(differing)} (see Environment)."
    return text


def _recipe_text(recipe: dict) -> str:
    """The recipe as YAML (as users write it); JSON if YAML cannot represent it."""
    try:
        return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=100)
    except yaml.YAMLError:
        return json.dumps(recipe, indent=2, ensure_ascii=False, default=str)


def build_content(
    record: RunRecord, files: RunFiles | None = None, *, with_plots: bool = True
) -> ReportContent:
    """Derive the whole report from ``record`` and ``files`` (no I/O, no clock).

    ``files`` holds what the stages left beside their models (weights, per-layer
    tables); without it the report is what ``run.json`` alone can say.
    """
    files = files if files is not None else RunFiles()
    stages = _ordered(record)
    budget = accuracy_budget(record)
    reference = reference_stage(record, stages)
    ref = reference.stage.name if reference is not None else "the reference"
    comparisons = compare_all(stages, reference, budget, record.side_by_side)
    timed = side_by_side_stages(stages, record.side_by_side)
    notes = [thresholds_text(ref)]
    if reference is not None:
        notes.append(reference.note)
    notes.append(
        f"Accuracy budget: {budget:g} points of top-1 below {ref}."
        if budget is not None
        else "No accuracy budget set (recipe `report.accuracy_budget`)."
    )
    notes.append(
        "Sizes are the saved artifact on disk, 1 MB = 10^6 bytes; latency is per call at "
        f"batch 1; ratios in brackets are against {ref} (> 1 is better)."
    )
    environment = environment_summary(stages)
    notes.append(_measured_on(environment))
    notes.extend(_like_for_like_notes(stages, reference))
    notes.extend(_runtime_notes(stages, comparisons, reference))
    notes.extend(_timing_notes(record, stages, reference, timed))
    notes.extend(_noise_notes(stages, record.side_by_side))
    notes.extend(files.notes)
    position = reference.position if reference is not None else None
    plots: tuple[Plot, ...] = ()
    if with_plots:
        pruning = pruning_plots(stages, files, budget, position,
                                stage_inputs(record, stages))
        plots = tuple(all_plots(stages, budget, pruning, position))
    return ReportContent(
        title=f"netshrink report: {record.name}",
        meta=(
            ("run", record.name),
            ("created", record.created),
            ("updated", record.updated),
            ("netshrink", record.netshrink_version),
            ("recipe sha256", record.recipe_sha256),
        ),
        headline=_headline(stages, comparisons, reference, timed),
        notes=tuple(notes),
        comparison=comparison_table(stages, comparisons, reference),
        measurement=measurement_table(stages, record.side_by_side),
        environment=environment,
        histories=tuple(history_table(s) for s in stages if s.history),
        layer_tables=layer_tables(stages, files),
        stage_notes=tuple((s.name, tuple(s.notes)) for s in stages if s.notes),
        plots=plots,
        recipe_text=_recipe_text(record.recipe),
    )
