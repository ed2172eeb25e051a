"""The report's tables as plain strings, built once and rendered by Markdown and HTML alike.

Building cells here (rather than in each renderer) is what keeps the two outputs saying
exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from netshrink.bench.schema import Latency, Measurement
from netshrink.report import fmt
from netshrink.report.verdict import (
    LATENCY,
    THROUGHPUT,
    Comparison,
    Reference,
    SpeedSplit,
    measurement_on,
    speed_split,
)
from netshrink.stages.record import SideBySide, StageRecord


@dataclass(frozen=True)
class TableView:
    """Some of a wide table's columns, shown as a table of their own where the page has a
    width to keep to (the HTML report reads at 1280 px; Markdown keeps the one table).

    ``columns`` index the table's columns, each shown under a short header from
    ``headers`` (the full one stays with it, as a tooltip in HTML); ``beneath`` names, for
    each shown column, the columns whose cells are written under its own, quieter (a
    stage's kind and runtime under its name).
    """

    title: str | None  # None: shown under the table's own title
    columns: tuple[int, ...]
    headers: tuple[str, ...]
    beneath: tuple[tuple[int, ...], ...] = ()

    def under(self, position: int) -> tuple[int, ...]:
        """The columns written beneath the ``position``-th shown column."""
        return self.beneath[position] if position < len(self.beneath) else ()


@dataclass(frozen=True)
class Table:
    """A titled table of already formatted cells; ``numeric`` marks right-aligned columns;
    ``views``, if any, split it into narrower tables for a page with a width."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]
    views: tuple[TableView, ...] = ()


# The verdict comes right after the stage: it is what a reader looks for first, and on
# a narrow screen the right-hand columns are the ones scrolled out of view. The speed and
# memory columns come once per device (see _device_columns) and the stage time last.
LEADING_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("stage", False),
    ("kind", False),
    ("runtime, precision", False),
    ("verdict", False),
    ("top-1 %", True),
    ("top-5 %", True),
    ("size (vs reference)", True),
    ("params", True),
    ("non-zero params", True),
    ("MACs", True),
)

DEVICE_LABELS = {"cpu": "CPU", "cuda": "GPU"}
# Which device a peak-memory kind belongs to: the process RSS is host memory, the CUDA
# allocator's peak is GPU memory.
MEMORY_DEVICE = {"rss": "cpu", "cuda": "cuda"}
_MEMORY_WHAT = {"cpu": "process peak RSS MiB", "cuda": "peak memory MiB (reserved) (ratio)"}


def device_label(device: str) -> str:
    """``CPU``, ``GPU`` (for cuda), or the device's own name in capitals."""
    return DEVICE_LABELS.get(device, device.upper())


def _device_columns(device: str) -> tuple[tuple[str, bool], ...]:
    label = device_label(device)
    return (
        (f"{label} latency b1 p50 / p90 ms (speedup)", True),
        (f"{label} throughput img/s @ batch (ratio)", True),
        (f"{label} {_MEMORY_WHAT.get(device, 'peak memory MiB')}", True),
    )


# The same columns under short headers for the HTML page (what follows a newline is the
# header's quieter second line); the notes say what the brackets are.
_SHORT_MEMORY = {"cpu": "peak RSS\nMiB, whole process", "cuda": "peak memory\nMiB reserved"}


def _short_device_headers(device: str) -> tuple[str, str, str]:
    label = device_label(device)
    memory = _SHORT_MEMORY.get(device, "peak memory\nMiB")
    return (f"{label} latency\nms p50 / p90, batch 1", f"{label} throughput\nimg/s @ batch",
            f"{label} {memory}")


def _comparison_views(devices: Sequence[str]) -> tuple[TableView, ...]:
    """The comparison table as two tables that each read at 1280 px: what the verdict
    rests on (accuracy, size, speed) in one, so a stage's three are seen together, and the
    model's counts, memory and stage time in the other."""
    first_device = len(LEADING_COLUMNS)
    latency = [first_device + 3 * k for k in range(len(devices))]
    short = [_short_device_headers(d) for d in devices]
    speed = tuple(c for col in latency for c in (col, col + 1))
    speed_headers = tuple(h for lat, thr, _ in short for h in (lat, thr))
    memory = tuple(col + 2 for col in latency)
    stage_time = first_device + 3 * len(devices)
    return (
        TableView(title=None, columns=(0, 3, 4, 5, 6, *speed),
                  headers=("stage\nkind · runtime, precision", "verdict", "top-1 %", "top-5 %",
                           "size on disk", *speed_headers),
                  beneath=((1, 2),)),
        TableView(title="Parameters, compute, memory and time",
                  columns=(0, 7, 8, 9, *memory, stage_time),
                  headers=("stage", "params", "non-zero params", "MACs",
                           *(m for *_, m in short), "stage time")),
    )


def _memory_device(m: Measurement) -> str:
    return MEMORY_DEVICE.get(m.memory_kind or "", m.environment.device)


def table_devices(stages: Sequence[StageRecord]) -> tuple[str, ...]:
    """The devices the table has columns for: the CPU always, then any other measured on.

    The CPU columns stay even in a GPU run: ONNX Runtime stages are timed there, and an
    empty column says plainly that nothing was.
    """
    devices = ["cpu"]
    for s in stages:
        if s.measurement is not None:
            for d in (s.measurement.environment.device, _memory_device(s.measurement)):
                if d not in devices:
                    devices.append(d)
    return tuple(devices)


NOT_MEASURED = "not measured"  # a figure whose timing was noisy: none is given


def _with(cell: str, suffix: str | None) -> str:
    """``cell (suffix)``, or just ``cell`` when there is nothing to add or nothing measured."""
    return cell if suffix is None or cell == fmt.MISSING else f"{cell} ({suffix})"


def _rate(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _r(value: float | None) -> str | None:
    return None if value is None else fmt.ratio(value)


def _measured_cells(m: Measurement | None, cmp: Comparison, is_reference: bool) -> tuple[str, ...]:
    """The six cells from top-1 to MACs."""
    if m is None:
        return (fmt.MISSING,) * 6
    acc = m.accuracy
    top1 = fmt.pct(acc.top1 if acc else None)
    if not is_reference and cmp.top1_delta is not None:
        top1 = _with(top1, fmt.points(cmp.top1_delta))
    nonzero = fmt.count(m.nonzero_params)
    if m.params > 0:
        nonzero = _with(nonzero, f"{m.nonzero_params / m.params:.1%}")
    size = _with(fmt.megabytes(m.size_bytes), _r(cmp.size_ratio))
    packed = (m.sizes or {}).get("packed")
    if packed and m.size_bytes and cmp.size_ratio is not None:
        # The packed file (sparse, bit-packed, zstd) is storage; the runtime loads the other.
        packed_ratio = fmt.ratio(cmp.size_ratio * m.size_bytes / packed)
        size += f"; packed {fmt.megabytes(packed)} ({packed_ratio})"
    return (
        top1,
        fmt.pct(acc.top5 if acc else None),
        size,
        fmt.count(m.params),
        nonzero,
        fmt.macs(m.macs),
    )


def _split_text(split: SpeedSplit, what: str) -> str:
    """How a stage in another runtime than the reference got its ``what`` ratio: ``, runtime
    only``, `` = 5.71x at equal runtime × 4.41x runtime``, `` across runtimes`` (and why it
    is not split, where a timing of the split was noisy)."""
    if not split.other_runtime:
        return ""
    if split.is_variant:
        return ", runtime only"
    if split.equal is None or split.runtime is None:
        return " across runtimes"
    equal, runtime = split.equal.figure(what), split.runtime.figure(what)
    if equal is not None and runtime is not None:
        return f" = {fmt.ratio(equal)} at equal runtime × {fmt.ratio(runtime)} runtime"
    noisy = dict.fromkeys((*split.equal.noisy(what), *split.runtime.noisy(what)))
    return " across runtimes" + (f"; no split: {' and '.join(noisy)} noisy" if noisy else "")


def _speed_note(split: SpeedSplit | None, what: str, own: Latency | None,
                stage: str) -> str | None:
    """The bracket after a ``what`` (latency or throughput) figure of ``stage``: ``noisy``
    when its own timing is, then its ratio against the reference and, for a stage in
    another runtime, that ratio split into equal runtime x runtime
    (``25.17x = 5.71x at equal runtime × 4.41x runtime``). A ratio resting on a noisy
    timing is not given: ``no ratio: teacher noisy`` names whose timing it was."""
    own_noisy = own is not None and own.noise_reason() is not None
    parts = ["noisy"] if own_noisy else []
    if split is not None:
        value = split.overall.figure(what)
        if value is not None:
            parts.append(fmt.ratio(value) + _split_text(split, what))
        else:
            # the row's own noisy timing is said already
            noisy = [n for n in split.overall.noisy(what) if not (own_noisy and n == stage)]
            if noisy:
                parts.append(f"no ratio: {' and '.join(noisy)} noisy")
    return "; ".join(parts) or None


def _figure(lat: Latency, text: str, instead: str = NOT_MEASURED) -> str:
    """``text`` (a figure of the timing ``lat``), or ``instead`` where ``lat`` is noisy: a
    noisy timing gives no figure; its bracket says "noisy" and the notes why."""
    return instead if lat.noise_reason() is not None else text


def _device_cells(stage: StageRecord, cmp: Comparison, reference: Reference | None,
                  device: str) -> tuple[str, ...]:
    """Latency, throughput and peak memory if measured on ``device``, else dashes.

    The stage's own measurement carries the comparison's ratios; a CPU timing added to a
    GPU stage (``measure.also_cpu``) is compared with the reference's CPU timing.
    """
    lat = thr = mem = fmt.MISSING
    m = measurement_on(stage, device)
    if m is stage.measurement:
        split, memory_ratio = cmp.speed, cmp.memory_ratio
    else:
        split = (speed_split(stage, reference.stage, device, reference.variants)
                 if reference is not None else None)
        memory_ratio = None
    if m is not None:
        if m.latency is not None:
            lat = _with(_figure(m.latency, f"{m.latency.p50_ms:.2f} / {m.latency.p90_ms:.2f}"),
                        _speed_note(split, LATENCY, m.latency, stage.name))
        if m.throughput is not None:
            thr = _with(_figure(m.throughput, f"{_rate(m.throughput.images_per_s)} @ "
                                              f"{m.throughput.batch_size}"),
                        _speed_note(split, THROUGHPUT, m.throughput, stage.name))
    for held in (stage.measurement, stage.cpu_measurement):
        if held is not None and held.peak_memory_mb is not None and \
                _memory_device(held) == device:
            mem = _with(f"{held.peak_memory_mb:.1f}",
                        _r(memory_ratio) if held is stage.measurement else None)
            break
    return (lat, thr, mem)


def comparison_table(
    stages: Sequence[StageRecord], comparisons: Sequence[Comparison], reference: Reference | None
) -> Table:
    """One row per stage, in order, every number next to its ratio vs the reference.

    Rows before the reference are shown too; one that was not evaluated (an untrained
    start) shows what was measured and no ratio.

    Speed and memory get a group of columns per device, so a GPU latency never sits
    under a CPU heading; GPU columns appear only when some stage was measured on a GPU.
    """
    devices = table_devices(stages)
    columns = (
        *LEADING_COLUMNS,
        *(c for d in devices for c in _device_columns(d)),
        ("stage time", True),
    )
    rows = tuple(
        (
            stage.name,
            stage.kind,
            f"{stage.measurement.runtime}, {stage.measurement.precision}"
            if stage.measurement else fmt.MISSING,
            cmp.verdict,
            *_measured_cells(stage.measurement, cmp,
                             is_reference=reference is not None and i == reference.position),
            *(c for d in devices for c in _device_cells(stage, cmp, reference, d)),
            fmt.seconds(stage.seconds),
        )
        for i, (stage, cmp) in enumerate(zip(stages, comparisons, strict=True))
    )
    return Table(
        title=(f"Stages compared with the reference ({reference.stage.name})"
               if reference is not None else "Stages compared with the reference"),
        headers=tuple(h for h, _ in columns),
        rows=rows,
        numeric=tuple(n for _, n in columns),
        views=_comparison_views(devices),
    )


# label -> how to read it from a measurement; the order is the order shown.
ENVIRONMENT_FIELDS: tuple[tuple[str, Callable[[Measurement], str]], ...] = (
    ("cpu", lambda m: m.environment.cpu),
    ("cores", lambda m: str(m.environment.cores)),
    ("gpu", lambda m: m.environment.gpu or "none"),
    ("device", lambda m: m.environment.device),
    ("threads", lambda m: str(m.environment.threads)),
    ("torch", lambda m: m.environment.versions.get("torch", fmt.MISSING)),
    ("python", lambda m: m.environment.python),
    ("platform", lambda m: m.environment.platform),
    ("seed", lambda m: str(m.environment.seed)),
    ("runtime", lambda m: m.runtime),
    ("precision", lambda m: m.precision),
)


@dataclass(frozen=True)
class EnvironmentSummary:
    """Fields identical for every measured stage (shown once) and a table of the rest."""

    common: tuple[tuple[str, str], ...]
    per_stage: Table | None


def environment_summary(stages: Sequence[StageRecord]) -> EnvironmentSummary:
    """Split environment fields into those all stages share and those that differ.

    A field shown once is a promise that every number in the report was measured under
    it; a field that differs (typically runtime or precision) gets a column per stage.
    """
    measured = [s for s in stages if s.measurement is not None]
    values = {
        label: [get(s.measurement) for s in measured]  # type: ignore[arg-type]
        for label, get in ENVIRONMENT_FIELDS
    }
    common = tuple((label, v[0]) for label, v in values.items() if v and len(set(v)) == 1)
    differing = [label for label, v in values.items() if len(set(v)) > 1]
    per_stage = None
    if differing:
        per_stage = Table(
            title="Environment per stage (fields that differ between stages)",
            headers=("stage", *differing),
            rows=tuple(
                (s.name, *(values[label][i] for label in differing)) for i, s in enumerate(measured)
            ),
            numeric=(False,) * (1 + len(differing)),
        )
    return EnvironmentSummary(common=common, per_stage=per_stage)


def _timing(lat: Latency | None) -> str:
    """``batch 1: 60 runs in 3 rounds after 10 warm-up; p90/p50 1.08, round medians 2.1%
    apart`` and, when too unsteady to compare, ``; noisy`` (the notes say why, once)."""
    if lat is None:
        return fmt.MISSING
    rounds = f" in {lat.rounds} rounds" if lat.rounds > 1 else ""
    text = f"batch {lat.batch_size}: {lat.runs} runs{rounds} after {lat.warmup} warm-up"
    spread = [f"p90/p50 {ratio:.2f}"] if (ratio := lat.p90_over_p50) is not None else []
    if lat.round_spread is not None:
        spread.append(f"round medians {lat.round_spread:.1%} apart")
    if spread:
        text += "; " + ", ".join(spread)
    if lat.noise_reason() is not None:
        text += "; noisy"
    return text


def _load(m: Measurement) -> str:
    """``calibration 1.02 ms, load avg 0.85``: the CPU-load reading taken with a timing."""
    if m.load is None:
        return fmt.MISSING
    avg = f", load avg {m.load.load_avg:.2f}" if m.load.load_avg is not None else ""
    return f"calibration {m.load.calibration_ms:.2f} ms{avg}"


def _side_by_side(stage: StageRecord, side_by_side: SideBySide | None) -> str:
    """``p50 0.680 ms, 1,234 img/s (5 rounds, 2.1% / 3.0% apart)``, or not timed; a noisy
    figure is ``not measured (noisy)``."""
    t = side_by_side.of(stage) if side_by_side is not None else None
    if t is None:
        return fmt.MISSING
    noisy = f"{NOT_MEASURED} (noisy)"
    parts = [f"p50 {_figure(t.latency, f'{t.latency.p50_ms:.3f} ms', noisy)}"]
    spreads = [f"{t.latency.round_spread:.1%}"] if t.latency.round_spread is not None else []
    if t.throughput is not None:
        parts.append(_figure(t.throughput, f"{t.throughput.images_per_s:,.0f} img/s",
                             f"img/s {noisy}"))
        if t.throughput.round_spread is not None:
            spreads.append(f"{t.throughput.round_spread:.1%}")
    return (", ".join(parts) + f" ({t.latency.rounds} rounds"
            + (f", {' / '.join(spreads)} apart" if spreads else "") + ")")


def measurement_table(stages: Sequence[StageRecord],
                      side_by_side: SideBySide | None = None) -> Table:
    """How each number was obtained: accuracy split, timing runs, the CPU load read with
    them, the end-of-run side-by-side timing, artifact measured."""
    rows = []
    for s in stages:
        m = s.measurement
        if m is None:
            rows.append((s.name, *(fmt.MISSING,) * 7))
            continue
        acc = m.accuracy
        rows.append(
            (
                s.name,
                f"{acc.split}, {acc.images:,} images" if acc else fmt.MISSING,
                _timing(m.latency),
                _timing(m.throughput),
                _load(m),
                _side_by_side(s, side_by_side),
                "×".join(str(d) for d in m.input_shape),
                m.file or fmt.MISSING,
            )
        )
    # On the page the input shape and the file go under the stage's name: short or
    # breakable, they need no column of their own, which leaves the timing prose room.
    view = TableView(title=None, columns=(0, 1, 2, 3, 4, 5),
                     headers=("stage\ninput · file", "accuracy on", "latency", "throughput",
                              "CPU load", "side by side\n(end of run)"),
                     beneath=((6, 7),))
    return Table(
        title="How each stage was measured",
        headers=("stage", "accuracy on", "latency", "throughput", "CPU load",
                 "side by side (end of run)", "input", "file"),
        rows=tuple(rows),
        numeric=(False,) * 8,
        views=(view,),
    )


def history_table(stage: StageRecord) -> Table:
    """The stage's training history, one row per epoch."""
    return Table(
        title=f"Training history: {stage.name}",
        headers=("epoch", "train loss", "train top-1 %", "val top-1 %", "lr", "time"),
        rows=tuple(
            (
                str(e.epoch),
                fmt.number(e.train_loss, ".4f"),
                fmt.pct(e.train_top1),
                fmt.pct(e.val_top1),
                fmt.number(e.lr, ".3g"),
                fmt.seconds(e.seconds),
            )
            for e in stage.history
        ),
        numeric=(True,) * 6,
    )
