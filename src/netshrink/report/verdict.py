"""Each stage against the reference: ratios, accuracy change and a plain-words verdict.

The reference is the stage the recipe's ``report.baseline`` names, by default the first
evaluated stage (:func:`reference_stage`). The thresholds are deliberately small but
non-zero: a 1% size change is file-format noise and a 3% latency change is within
run-to-run timing noise on a shared CPU, so neither may be called "smaller" or "faster".

A speed verdict needs two timings to agree: batch-1 latency and batch-N throughput must
both move past the threshold in the same direction, and neither timing may be noisy
(:meth:`Latency.noise_reason`). A stage that runs in another runtime than the reference
is judged against the reference's model in its own runtime (the teacher's ONNX export
for an ONNX Runtime INT8 student): what the runtime gave is reported beside it, never
as the compression's gain (:class:`SpeedSplit`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from netshrink.bench.schema import NOISY_P90_OVER_P50, NOISY_ROUND_SPREAD, Latency, Measurement
from netshrink.errors import UserError
from netshrink.report import fmt
from netshrink.report.lineage import model_origins
from netshrink.stages.record import RunRecord, SideBySide, StageRecord

SMALLER_MIN_RATIO = 1.02  # reference size / stage size: at least ~2% smaller
FASTER_MIN_SPEEDUP = 1.05  # reference p50 / stage p50: at least ~5% lower latency

# The speed verdict's words. "mixed speed (...)" and "speed unconfirmed (...)" carry figures.
FASTER, SLOWER, NOT_FASTER = "faster", "slower", "not faster"
NOT_RELIABLE = "not measured reliably"
LATENCY_UNKNOWN = "latency unknown"
OTHER_DEVICE = "speed not comparable (other device)"

# The note the runner gives a fresh init it only counted and sized (no accuracy, no speed).
UNTRAINED_NOTE = "a fresh, untrained model"
REFERENCE_VERDICT = "reference"


def thresholds_text(reference: str) -> str:
    """The verdict thresholds in words, against the reference stage named ``reference``."""
    return (
        f'Verdict thresholds: "smaller" needs {reference} size / stage size ≥ '
        f"{SMALLER_MIN_RATIO:.2f} (at least ~2% smaller on disk); \"faster\" needs both "
        f"{reference} batch-1 p50 latency / stage p50 and stage / {reference} batch-N "
        f"throughput ≥ {FASTER_MIN_SPEEDUP:.2f} (at least ~5% better), or more where the "
        "timings' own round-to-round spreads add up to more, and \"slower\" both ≤ the "
        'inverse; where the two disagree the verdict says "mixed speed". A timing whose '
        f"p90/p50 exceeds {NOISY_P90_OVER_P50:g} or whose rounds' medians are more than "
        f"{NOISY_ROUND_SPREAD:.0%} apart is noisy, and a verdict resting on it says \"not "
        'measured reliably". "accuracy below budget" means top-1 fell by more than the '
        f"recipe's report.accuracy_budget (points) below {reference}. Speed is compared only "
        "between measurements on the same device (CPU or GPU), and a stage in another "
        f"runtime than {reference} is judged against {reference}'s model in that runtime "
        "(\"at equal runtime\")."
    )


@dataclass(frozen=True)
class Comparison:
    """One stage relative to the reference; ``None`` where either side was not measured."""

    size_ratio: float | None  # reference / stage: > 1 means smaller
    # reference p50 / stage p50: > 1 means faster; same device only, neither timing noisy
    speedup: float | None
    throughput_ratio: float | None  # stage img/s / reference img/s, same batch and device
    top1_delta: float | None  # stage - reference, percentage points
    verdict: str
    memory_ratio: float | None = None  # reference peak / stage peak, same kind of peak only
    # The speed on the stage's own device split into equal runtime x runtime; None when
    # either side has no timing there.
    speed: SpeedSplit | None = None


@dataclass(frozen=True)
class Reference:
    """The stage every row is compared with: where it stands in the ordered stages, and a
    note saying which stage it is and why."""

    position: int  # index into the stages ordered by their ``index``
    stage: StageRecord
    note: str
    # The reference's model in other runtimes (the teacher's ONNX export, its deploy.torch
    # stage): the same network at the same precision, deployed from the same torch model.
    variants: tuple[StageRecord, ...] = ()


def _report_section(record: RunRecord) -> dict[str, Any]:
    section: Any = record.recipe.get("report") or {}
    if not isinstance(section, dict):
        raise UserError(f"recipe of run {record.name!r}: `report` must be a mapping")
    return section


def accuracy_budget(record: RunRecord) -> float | None:
    """The recipe's ``report.accuracy_budget`` (points of top-1 one may lose), if any."""
    budget = _report_section(record).get("accuracy_budget")
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
        raise UserError(
            f"recipe of run {record.name!r}: report.accuracy_budget must be a number of "
            f"top-1 points ≥ 0, got {budget!r}"
        )
    return float(budget)


def _measured(stage: StageRecord) -> bool:
    return stage.status == "done" and stage.measurement is not None


def _evaluated(stage: StageRecord) -> bool:
    m = stage.measurement
    return stage.status == "done" and m is not None and m.accuracy is not None


def _default_reference(stages: Sequence[StageRecord]) -> tuple[int, str]:
    """The first evaluated stage (the baseline unless it is an untrained start), and why."""
    position = next((i for i, s in enumerate(stages) if _evaluated(s)), None)
    if position is None:
        position = next((i for i, s in enumerate(stages) if _measured(s)), 0)
        return position, f"{stages[position].name} (no stage has a measured accuracy yet)"
    if position == 0:
        return 0, f"{stages[0].name}, the model the recipe starts from"
    skipped = ", ".join(s.name for s in stages[:position])
    return position, (f"{stages[position].name}, the first stage with a measured accuracy "
                      f"({skipped} not evaluated)")


def reference_stage(record: RunRecord, stages: Sequence[StageRecord]) -> Reference | None:
    """The stage the report compares every row with (None when there are no stages).

    The recipe's ``report.baseline`` names it; by default (or while the named stage has
    no measurement, e.g. a run in progress) it is the first stage with a measured
    accuracy: the baseline, or the trained model of a recipe that starts from a fresh
    init. ``stages`` are the run's stages ordered by index. Its ``variants`` are the
    stages that hold its model in another runtime (:func:`reference_variants`).

    Raises:
        UserError: ``report.baseline`` is not a stage name (a hand-edited ``run.json``).
    """
    chosen = _pick_reference(record, stages)
    if chosen is None:
        return None
    return replace(chosen, variants=reference_variants(record, stages, chosen.stage))


def reference_variants(record: RunRecord, stages: Sequence[StageRecord],
                       reference: StageRecord) -> tuple[StageRecord, ...]:
    """The stages that run the reference's model in another runtime: deployed from the
    same torch model, at the reference's precision, with its parameter counts (the
    teacher's ``export.onnx`` stage for a torch teacher, or the teacher for its export)."""
    b = reference.measurement
    if b is None:
        return ()
    origins = model_origins(record)
    origin = origins.get(reference.name, reference.name)
    return tuple(
        s for s in stages
        if s is not reference and _measured(s) and origins.get(s.name, s.name) == origin
        and s.measurement is not None and s.measurement.precision == b.precision
        and (s.measurement.params, s.measurement.nonzero_params) == (b.params, b.nonzero_params)
    )


def _pick_reference(record: RunRecord, stages: Sequence[StageRecord]) -> Reference | None:
    if not stages:
        return None
    wanted = _report_section(record).get("baseline")
    if wanted is not None and not isinstance(wanted, str):
        raise UserError(f"recipe of run {record.name!r}: report.baseline must be a stage "
                        f"name, got {wanted!r}")
    if wanted is not None:
        named = next((i for i, s in enumerate(stages) if s.name == wanted), None)
        if named is not None and _measured(stages[named]):
            note = (f"Reference: {wanted} (recipe `report.baseline`); every ratio, top-1 "
                    "change and verdict is against it.")
            if not _evaluated(stages[named]):
                note += (" It has no measured accuracy, so no top-1 change or accuracy "
                         "budget can be judged.")
            return Reference(named, stages[named], note)
    position, chosen = _default_reference(stages)
    if wanted is not None:
        note = (f"Reference: recipe `report.baseline` names {wanted}, which has no "
                "measurement yet (the run is in progress, or that stage failed), so the "
                f"report compares with {chosen} instead.")
    else:
        note = (f"Reference: {chosen}; every ratio, top-1 change and verdict is against "
                "it (recipe `report.baseline` picks another stage).")
    return Reference(position, stages[position], note)


def _not_evaluated(stage: StageRecord) -> Comparison:
    """A stage before the reference that was only counted and sized: nothing to compare."""
    untrained = any(note.startswith(UNTRAINED_NOTE) for note in stage.notes)
    verdict = "untrained start (not evaluated)" if untrained else "not evaluated"
    return Comparison(None, None, None, None, verdict)


def compare_all(
    stages: Sequence[StageRecord], reference: Reference | None, budget: float | None,
    side_by_side: SideBySide | None = None,
) -> list[Comparison]:
    """Every stage against the reference, in order.

    A stage before the reference with no accuracy (the fresh init a recipe trains) gets
    no ratios: its row shows what was measured and says it was not evaluated. Where the
    run's files were timed ``side_by_side`` at its end, a stage timed there is compared
    on those timings with the reference (and its runtime variants) timed there too; a
    pair never mixes a side-by-side timing with a stage's own.
    """
    if reference is None:
        return []
    timed = side_by_side_stages(stages, side_by_side)
    result = []
    for i, s in enumerate(stages):
        if i < reference.position and _measured(s) and not _evaluated(s):
            result.append(_not_evaluated(s))
        elif s.name in timed and reference.stage.name in timed:
            variants = [timed[v.name] for v in reference.variants if v.name in timed]
            result.append(compare(timed[s.name], timed[reference.stage.name], budget,
                                  variants))
        else:  # its own timing against the reference's own timing
            result.append(compare(s, reference.stage, budget, reference.variants))
    return result


def side_by_side_stages(stages: Sequence[StageRecord], side_by_side: SideBySide | None
                        ) -> dict[str, StageRecord]:
    """Each stage timed side by side at the end of the run, by name, as a copy whose
    latency and throughput are those timings (the rest of its measurement as it was)."""
    if side_by_side is None:
        return {}
    timed = {}
    for s in stages:
        t = side_by_side.of(s)
        if t is None or s.measurement is None:
            continue
        update: dict[str, Any] = {"latency": t.latency}
        if t.throughput is not None:
            update["throughput"] = t.throughput
        timed[s.name] = s.model_copy(
            update={"measurement": s.measurement.model_copy(update=update)})
    return timed


def _div(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0 or not math.isfinite(num / den):
        return None
    return num / den


def measurement_on(stage: StageRecord, device: str) -> Measurement | None:
    """The stage's timing on ``device``: its measurement, or the CPU timing a GPU recipe
    with ``measure.also_cpu`` adds to its torch stages; None if it has none there."""
    m = stage.measurement
    if m is not None and m.environment.device == device:
        return m
    return stage.cpu_measurement if device == "cpu" else None


def speed_ratios(m: Measurement | None, b: Measurement | None
                 ) -> tuple[float | None, float | None]:
    """(latency speedup b/m, throughput ratio m/b) of two timings on one device."""
    if m is None or b is None:
        return None, None
    speedup = _div(b.latency.p50_ms, m.latency.p50_ms) if m.latency and b.latency else None
    # img/s at different batch sizes measures different things; no ratio then.
    ratio = None
    if m.throughput and b.throughput and m.throughput.batch_size == b.throughput.batch_size:
        ratio = _div(m.throughput.images_per_s, b.throughput.images_per_s)
    return speedup, ratio


RUNTIME_NAMES = {"torch": "torch", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO",
                 "tensorrt": "TensorRT"}


def runtime_family(m: Measurement) -> tuple[Any, ...]:
    """What decides a timing besides the model: device, runtime, and how torch runs it
    (eager or compiled, memory layout). Precision and 2:4 kernels are the compression's,
    so an INT8 model and its float original in one runtime are at equal runtime."""
    family: tuple[Any, ...] = (m.environment.device, m.runtime)
    if m.runtime == "torch":
        opts = m.runtime_options or {}
        family += (bool(opts.get("channels_last", False)), opts.get("compile", "off"))
    return family


def runtime_name(m: Measurement) -> str:
    """``ONNX Runtime``, ``eager torch``, ``torch.compile max-autotune, channels_last``."""
    name = RUNTIME_NAMES.get(m.runtime, m.runtime)
    if m.runtime == "torch":
        opts = m.runtime_options or {}
        compiled = opts.get("compile", "off")
        name = "eager torch" if compiled == "off" else f"torch.compile {compiled}"
        if opts.get("channels_last"):
            name += ", channels_last"
    return name


LATENCY, THROUGHPUT = "latency", "throughput"  # the two figures a speed ratio is of


@dataclass(frozen=True)
class Noise:
    """One timing too unsteady to compare: whose (a stage's name), which figure
    (``latency`` or ``throughput``) and why (``round medians 42% apart > 10%``)."""

    who: str
    what: str
    reason: str

    def __str__(self) -> str:
        return f"{self.who} {self.what}: {self.reason}"


@dataclass(frozen=True)
class SpeedJudgement:
    """Two timings of one device compared: latency and throughput ratios and the verdict.

    A ratio computed from a noisy timing is not a measurement, so it is not kept: the
    ratio is None and ``noise`` says which timing was noisy and why. Nothing downstream
    (headline, table, CLI) can then print it by mistake.
    """

    speedup: float | None  # other p50 / this p50: > 1 is faster; None: not measured
    throughput_ratio: float | None  # this img/s / other img/s at the same batch size
    word: str  # faster, slower, not faster, mixed speed (...), not measured reliably, ...
    noise: tuple[Noise, ...] = ()  # the noisy timings among the two

    @property
    def decided(self) -> bool:
        """Whether the word is a plain verdict (faster, slower, not faster)."""
        return self.word in (FASTER, SLOWER, NOT_FASTER)

    @property
    def timed(self) -> bool:
        """Whether both sides have a batch-1 timing (noisy or not) to compare."""
        return self.word != LATENCY_UNKNOWN

    def figure(self, what: str) -> float | None:
        """The ``latency`` (speed-up) or ``throughput`` ratio; None where not measured."""
        return self.speedup if what == LATENCY else self.throughput_ratio

    def noisy(self, what: str) -> tuple[str, ...]:
        """The names of the two whose ``what`` timing was noisy (its ratio withheld)."""
        return tuple(dict.fromkeys(n.who for n in self.noise if n.what == what))

    def noisy_timings(self) -> str:
        """``finetune latency and teacher throughput``: which timings were noisy."""
        return " and ".join(f"{n.who} {n.what}" for n in self.noise)


def _spread(lat: Latency | None) -> float:
    return (lat.round_spread or 0.0) if lat is not None else 0.0


def _direction(ratio: float, a: Latency | None, b: Latency | None) -> int:
    """+1 past the threshold (and past the two timings' own round spreads), -1 past its
    inverse, 0 in between."""
    threshold = max(FASTER_MIN_SPEEDUP, 1.0 + _spread(a) + _spread(b))
    return 1 if ratio >= threshold else -1 if ratio <= 1.0 / threshold else 0


def judge_speed(m: Measurement, b: Measurement, *, names: tuple[str, str] = ("stage", "reference")
                ) -> SpeedJudgement:
    """Compare the timing ``m`` with ``b`` (same device): faster only if batch-1 latency
    and batch-N throughput agree, and neither timing is noisy. ``names`` label the two in
    the noise reasons."""
    speedup, ratio = speed_ratios(m, b)
    noise = tuple(
        Noise(who, what, reason)
        for who, x in zip(names, (m, b), strict=True)
        for what, lat in ((LATENCY, x.latency),
                          (THROUGHPUT, x.throughput if ratio is not None else None))
        if lat is not None and (reason := lat.noise_reason()) is not None
    )
    # a ratio with a noisy timing on either side is withheld, the other one kept
    shown = (None if any(n.what == LATENCY for n in noise) else speedup,
             None if any(n.what == THROUGHPUT for n in noise) else ratio)
    if speedup is None:
        return SpeedJudgement(*shown, LATENCY_UNKNOWN, noise)
    if noise:
        return SpeedJudgement(*shown, NOT_RELIABLE, noise)
    if ratio is None:
        # One figure cannot make a verdict: a p50 alone has been 1.07x "faster" at 0.03x
        # the throughput.
        word = f"speed unconfirmed (latency {fmt.ratio(speedup)}, no throughput to compare)"
        return SpeedJudgement(speedup, ratio, word)
    lat_dir = _direction(speedup, m.latency, b.latency)
    thr_dir = _direction(ratio, m.throughput, b.throughput)
    if lat_dir == thr_dir:
        word = {1: FASTER, -1: SLOWER, 0: NOT_FASTER}[lat_dir]
    else:
        word = f"mixed speed (latency {fmt.ratio(speedup)}, throughput {fmt.ratio(ratio)})"
    return SpeedJudgement(speedup, ratio, word)


@dataclass(frozen=True)
class SpeedSplit:
    """A stage's speed against the reference on one device, split in two.

    ``overall`` compares with the reference as measured. When the stage runs in another
    runtime (ONNX Runtime against an eager torch reference), ``equal`` compares it with
    the reference's model in the stage's own runtime (``same_runtime``: the teacher's
    ONNX export), which is what the model change gave, and ``runtime`` compares the
    reference with that export, which is what the runtime gave: overall = equal x runtime.
    """

    overall: SpeedJudgement
    same_runtime: StageRecord | None  # the reference's model in the stage's runtime; None: none
    equal: SpeedJudgement | None  # stage vs same_runtime; None when there is none
    runtime: SpeedJudgement | None  # same_runtime vs the reference; None when the same stage
    stage_runtime: str  # runtime_name of the stage's timing
    reference_runtime: str
    other_runtime: bool  # the stage runs in another runtime family than the reference
    is_variant: bool = False  # the stage is the reference's model itself, in another runtime

    @property
    def word(self) -> str:
        """The verdict's speed part: judged at equal runtime where the runtimes differ."""
        if not self.other_runtime:
            return self.overall.word
        if self.is_variant:
            # The same model in another runtime: all of its speed-up is the runtime's.
            return (f"{self.overall.word} (runtime only)" if self.overall.word in (FASTER, SLOWER)
                    else self.overall.word)
        if self.equal is not None:
            word = self.equal.word
            if self.equal.decided:
                return f"{word} at equal runtime"
            if word.startswith("mixed speed ("):
                return word.replace("mixed speed (", "mixed speed at equal runtime (", 1)
            return word
        word = self.overall.word
        return f"{word} across runtimes (no same-runtime reference)" if self.overall.decided \
            else word


def speed_split(stage: StageRecord, reference: StageRecord, device: str,
                variants: Sequence[StageRecord] = ()) -> SpeedSplit | None:
    """The stage's speed on ``device`` against the reference's timing there, split into
    equal runtime x runtime (None when either has no timing on ``device``)."""
    m, b = measurement_on(stage, device), measurement_on(reference, device)
    if m is None or b is None:
        return None
    overall = judge_speed(m, b, names=(stage.name, reference.name))
    family = runtime_family(m)
    other = family != runtime_family(b)
    same: StageRecord | None = reference
    equal: SpeedJudgement | None = overall
    runtime: SpeedJudgement | None = None
    if other:
        same = next((v for v in variants
                     if (vm := measurement_on(v, device)) is not None
                     and runtime_family(vm) == family), None)
        equal = None
        if same is not None:
            sm = measurement_on(same, device)
            assert sm is not None
            equal = judge_speed(m, sm, names=(stage.name, same.name))
            runtime = judge_speed(sm, b, names=(same.name, reference.name))
    return SpeedSplit(overall=overall, same_runtime=same, equal=equal, runtime=runtime,
                      stage_runtime=runtime_name(m), reference_runtime=runtime_name(b),
                      other_runtime=other, is_variant=same is stage)


def compare(stage: StageRecord, reference: StageRecord, budget: float | None,
            variants: Sequence[StageRecord] = ()) -> Comparison:
    """Compare ``stage`` with ``reference`` (which itself gets the verdict "reference").

    ``variants`` hold the reference's model in other runtimes (``Reference.variants``):
    a stage in one of those runtimes is judged against it, at equal runtime.
    """
    m, b = stage.measurement, reference.measurement
    size_ratio = speedup = throughput_ratio = top1_delta = memory_ratio = None
    split: SpeedSplit | None = None
    other_device = False
    if m is not None and b is not None:
        size_ratio = _div(b.size_bytes, m.size_bytes)
        # A GPU time against a CPU time says nothing about the compression (ONNX Runtime
        # stages of a CUDA run are timed on the CPU): speed is compared on one device only,
        # against the reference's timing there if it has one (``measure.also_cpu``).
        same_device = measurement_on(reference, m.environment.device)
        other_device = same_device is None
        split = speed_split(stage, reference, m.environment.device, variants)
        if split is not None:  # the judgement's ratios: none from a noisy timing
            speedup, throughput_ratio = split.overall.speedup, split.overall.throughput_ratio
        # Only the CUDA allocator's peak belongs to the model's calls. A CPU figure is the
        # whole process's RSS, which also holds whatever earlier stages of the run left
        # (a teacher, a dataset): a ratio of two such figures would be about the process.
        if m.memory_kind == "cuda" and b.memory_kind == "cuda":
            memory_ratio = _div(b.peak_memory_mb, m.peak_memory_mb)
        if m.accuracy and b.accuracy:
            top1_delta = (m.accuracy.top1 - b.accuracy.top1) * 100

    if stage is reference:
        verdict = REFERENCE_VERDICT
    elif stage.status == "failed":
        verdict = "failed"
    elif m is None:
        verdict = "not measured"
    else:
        if other_device and m.latency is not None:
            speed_word = OTHER_DEVICE
        elif split is None or m.latency is None:
            speed_word = LATENCY_UNKNOWN
        else:
            speed_word = split.word
        parts = [
            "size unknown"
            if size_ratio is None
            else ("smaller" if size_ratio >= SMALLER_MIN_RATIO else "not smaller"),
            speed_word,
        ]
        if budget is not None:
            if top1_delta is None:
                parts.append("accuracy unknown")
            # The epsilon keeps float noise (0.70 - 0.71 = -1.0000000000000009) from
            # failing a stage that lost exactly the budget.
            elif -top1_delta > budget + 1e-9:
                parts.append("accuracy below budget")
            else:
                parts.append("accuracy within budget")
        verdict = ", ".join(parts)
    return Comparison(size_ratio, speedup, throughput_ratio, top1_delta, verdict, memory_ratio,
                      split)
