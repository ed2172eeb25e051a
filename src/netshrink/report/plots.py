"""The report's plots of the run record itself, as PNG bytes in memory.

Figures go through :func:`netshrink.figures.figure_png` (no pyplot). A plot with no data
is skipped rather than drawn empty. Plots of the files stages leave beside their models
(weights, sensitivity scans, search probes) are in :mod:`netshrink.report.prune_plots`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from netshrink.figures import figure_png, place_labels
from netshrink.report import fmt
from netshrink.report.tables import device_label
from netshrink.report.verdict import runtime_name
from netshrink.stages.record import StageRecord

# Colours by stage position so one stage has the same colour in every plot.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
# One marker a runtime, where a plot holds several.
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# A cost axis (size, latency) whose largest value is more than this many times its
# smallest is drawn in log scale.
LOG_AXIS_RANGE = 10.0


@dataclass(frozen=True)
class Plot:
    """One rendered plot: ``name`` is the file stem, ``alt`` a one-line text equivalent."""

    name: str
    title: str
    alt: str
    png: bytes


def literal_text(s: str) -> str:
    """Escape ``$`` so a stage name like ``$5 model`` is not parsed as mathtext."""
    return s.replace("$", r"\$")


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _label(i: int, name: str, reference: int | None, sep: str = " ") -> str:
    """The stage's name for a plot, ``(reference)`` added to the reference stage's."""
    return literal_text(name) + (f"{sep}(reference)" if i == reference else "")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x and higher y are better.

    Returned sorted by x (ties by descending y), which is the order to draw the front in.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best_y = float("-inf")
    for i in order:
        if points[i][1] > best_y:  # strictly better accuracy than anything as small
            front.append(i)
            best_y = points[i][1]
    return front


def top1_bar(
    stages: Sequence[StageRecord], budget: float | None, reference: int | None
) -> Plot | None:
    """Top-1 per stage (left) and its change vs the reference in points (right).

    ``reference`` is the reference stage's position in ``stages``; its bar is outlined
    and its name marked.

    The bars lie horizontally, one row a stage, the names on the left: a compress
    search's dozens of long ``cell/stage`` names stay readable, where names under
    upright bars ran into each other. Both panels have honest axes: absolute top-1 from
    0 to 100, where differences of a few tenths are invisible, hence the second panel,
    whose bars start at 0 change. The budget, when set, is drawn as the lowest
    acceptable change.
    """
    data = [
        (i, s.name, s.measurement.accuracy.top1 * 100)
        for i, s in enumerate(stages)
        if s.measurement is not None and s.measurement.accuracy is not None
    ]
    if not data:
        return None
    ys = range(len(data))
    names = [_label(i, n, reference) for i, n, _ in data]
    colours = [_colour(i) for i, *_ in data]
    edges = ["#222222" if i == reference else c for (i, *_), c in zip(data, colours, strict=True)]
    fig = Figure(figsize=(10.0, 1.3 + 0.3 * len(data)), layout="constrained")
    abs_ax, delta_ax = fig.subplots(1, 2, sharey=True)

    bars = abs_ax.barh(ys, [v for *_, v in data], color=colours, edgecolor=edges,
                       linewidth=1.5)
    abs_ax.bar_label(bars, labels=[f"{v:.2f}" for *_, v in data], padding=2, fontsize=8)
    abs_ax.set_xlim(0, 115)  # room right of 100 for the value labels
    abs_ax.set_xticks(range(0, 101, 20))
    abs_ax.set(title="Top-1 (%)", xlabel="top-1 (%)")
    abs_ax.set_yticks(ys, names)
    abs_ax.invert_yaxis()  # the first stage at the top, as in the tables

    ref_stage = stages[reference] if reference is not None else None
    base = ref_stage.measurement if ref_stage is not None else None
    said = ""
    if ref_stage is not None and base is not None and base.accuracy is not None:
        ref = ref_stage.name
        said = f"; change vs {ref} (the reference)"
        deltas = [v - base.accuracy.top1 * 100 for *_, v in data]
        bars = delta_ax.barh(ys, deltas, color=colours, edgecolor=edges, linewidth=1.5)
        delta_ax.bar_label(bars, labels=[f"{d:+.2f}" for d in deltas], padding=2, fontsize=8)
        delta_ax.axvline(0, color="#333333", linewidth=0.8)
        lows = [*deltas, 0.0]
        title = f"Change vs {literal_text(ref)} (points)"
        if budget is not None:
            # Named in the title, not a legend: a legend box would sit on some bar's label.
            delta_ax.axvline(-budget, color="#d62728", linestyle="--", linewidth=1)
            lows.append(-budget)
            title += f"; dashed: budget −{budget:g}"
        span = max(max(lows) - min(lows), 0.5)
        # room either side for the value labels at the bars' ends
        delta_ax.set_xlim(min(lows) - 0.3 * span, max(lows) + 0.3 * span)
        delta_ax.set(title=title, xlabel="points of top-1")
    else:
        delta_ax.set_axis_off()  # no reference accuracy: nothing to compare against
    for ax in (abs_ax, delta_ax):
        ax.grid(True, axis="x", alpha=0.3)
    alt = "; ".join(f"{n}: {v:.2f}%" for _, n, v in data)
    return Plot("top1", "Top-1 accuracy per stage", f"Top-1 per stage: {alt}{said}",
                figure_png(fig))


def _cost_axis(ax: Axes, values: Sequence[float]) -> bool:
    """Put the cost axis in log scale where its range calls for it (max / min past
    ``LOG_AXIS_RANGE``): on a linear axis one slow or large point crushes the rest into a
    corner. Ticks at 1, 2 and 5 of each decade, written as plain numbers. Returns whether
    the axis is logarithmic."""
    lo, hi = min(values), max(values)
    if lo <= 0 or hi / lo <= LOG_AXIS_RANGE:
        return False
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    return True


def _scatter(
    name: str,
    title: str,
    xlabel: str,
    data: list[tuple[int, str, float, float]],
    reference: int | None,
    *,
    runtimes: Sequence[str] = (),
    left_out: str = "",
) -> Plot | None:
    """Accuracy against a cost (lower is better), Pareto front dashed, points labelled;
    the reference stage (its position, ``reference``) is a star, or its runtime's marker
    drawn large where ``runtimes`` (one a point) name more than one runtime: each has a
    marker of its own, named in the legend. ``left_out`` (points not drawn, and why) is
    written under the plot and in its text equivalent.

    Fewer than two points make no plot (a lone dot says nothing the table does not).
    """
    if len(data) < 2:
        return None
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    kinds = list(dict.fromkeys(runtimes))
    markers = {k: MARKERS[j % len(MARKERS)] for j, k in enumerate(kinds)}
    several = len(kinds) > 1
    for k, (i, _, x, y) in enumerate(data):
        marker = markers[runtimes[k]] if several else "o"
        if i == reference:
            ax.scatter([x], [y], color=_colour(i), s=160, marker=marker if several else "*",
                       edgecolors="#222222", linewidths=1.2, zorder=4)
        else:
            ax.scatter([x], [y], color=_colour(i), s=40, marker=marker, zorder=3)
    log = _cost_axis(ax, [x for _, _, x, _ in data])
    front = pareto_front([(x, y) for _, _, x, y in data])
    handles = []
    if len(front) > 1:
        (line,) = ax.plot(
            [data[i][2] for i in front],
            [data[i][3] for i in front],
            drawstyle="steps-post",
            linestyle="--",
            color="#555555",
            linewidth=1,
            zorder=2,
            label="Pareto front",
        )
        handles.append(line)
    if several:
        handles += [Line2D([], [], color="#777777", marker=markers[k], linestyle="",
                           label=literal_text(k)) for k in kinds]
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_xlabel(xlabel + (" (log scale)" if log else ""))
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title + (", across runtimes" if several else ""))
    if left_out:
        fig.supxlabel(textwrap.fill(literal_text(left_out), 90), fontsize=8, color="#555555")
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)  # room for the labels of the outermost points
    # The reference first, then the front, then the rest: where labels crowd, the points
    # a reader looks for keep theirs.
    order = sorted(range(len(data)), key=lambda k: (data[k][0] != reference, k not in front))
    unlabelled = place_labels(ax, [(data[k][2], data[k][3], _label(data[k][0], data[k][1],
                                                                     reference))
                                   for k in order])
    on_front = ", ".join(data[i][1] for i in front)
    alt = f"{title}; Pareto front: {on_front}"
    alt += "".join(f"; reference: {label}" for i, label, *_ in data if i == reference)
    if several:
        alt += f"; across runtimes: {', '.join(kinds)}"
    if log:
        alt += "; log-scale x axis"
    if left_out:
        alt += f"; {left_out}"
    if unlabelled:
        alt += f"; {unlabelled} of {len(data)} points left unlabelled for room"
    return Plot(name, title, alt, figure_png(fig))


def size_vs_accuracy(stages: Sequence[StageRecord], reference: int | None) -> Plot | None:
    """Size on disk (MB) against top-1, for stages with both measured."""
    data = [
        (i, s.name, s.measurement.size_bytes / fmt.MB, s.measurement.accuracy.top1 * 100)
        for i, s in enumerate(stages)
        if s.measurement is not None
        and s.measurement.size_bytes is not None
        and s.measurement.accuracy is not None
    ]
    return _scatter("size_vs_accuracy", "Size on disk vs top-1", "size on disk (MB)", data,
                    reference)


def latency_vs_accuracy(stages: Sequence[StageRecord], reference: int | None) -> list[Plot]:
    """Batch-1 p50 latency (ms) against top-1, one plot per device timed on, every runtime
    named (a marker each where there are several).

    A CPU time and a GPU time on one axis would make a front of incomparable points. A
    noisy timing is no measurement: its point is left out, and the plot says so (as the
    tables say "not measured").
    """
    devices = sorted(
        {s.measurement.environment.device for s in stages if s.measurement is not None},
        key=lambda d: (d != "cpu", d),
    )
    plots = []
    for device in devices:
        timed = [
            (i, s, s.measurement)
            for i, s in enumerate(stages)
            if s.measurement is not None
            and s.measurement.environment.device == device
            and s.measurement.latency is not None
            and s.measurement.accuracy is not None
        ]
        steady = [(i, s, m) for i, s, m in timed if m.latency.noise_reason() is None]
        noisy = [s.name for _, s, m in timed if m.latency.noise_reason() is not None]
        data = [(i, s.name, m.latency.p50_ms, m.accuracy.top1 * 100) for i, s, m in steady]
        runtimes = [runtime_name(m) for *_, m in steady]
        label = device_label(device)
        one = len(set(runtimes)) == 1
        plot = _scatter(
            "latency_vs_accuracy" + ("" if device == "cpu" else f"_{device}"),
            f"Batch-1 {label} latency vs top-1",
            f"batch-1 p50 latency on {label}" + (f", {runtimes[0]}" if one else "") + " (ms)",
            data,
            reference,
            runtimes=runtimes,
            left_out=(f"Not plotted, their timing noisy (not measured): {', '.join(noisy)}"
                      if noisy else ""),
        )
        if plot is not None:
            plots.append(plot)
    return plots


def training_curves(stages: Sequence[StageRecord]) -> Plot | None:
    """Train loss and top-1 per epoch (val solid, train dashed) for stages trained two
    epochs or more (one epoch is one point: the history table shows it, no curve).

    One legend for both panels, under them, one entry a stage (its colour) and two for
    the line styles: a legend inside a panel covered the curves and, with a compress
    search's dozens of fine-tuned stages, ran off the panel over the titles.
    """
    # A stage trained one epoch has a point, not a curve: its history table shows it.
    trained = [(i, s) for i, s in enumerate(stages) if len(s.history) > 1]
    single = [s.name for s in stages if len(s.history) == 1]
    if not trained:
        return None
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    handles = []
    for i, s in trained:
        epochs = [e.epoch for e in s.history]
        (line,) = loss_ax.plot(
            epochs,
            [e.train_loss for e in s.history],
            marker="o",
            markersize=3,
            color=_colour(i),
            label=literal_text(s.name),
        )
        handles.append(line)
        acc_ax.plot(
            epochs,
            [e.train_top1 * 100 for e in s.history],
            linestyle="--",
            marker="x",
            markersize=4,
            color=_colour(i),
            linewidth=1,
        )
        val = [(e.epoch, e.val_top1 * 100) for e in s.history if e.val_top1 is not None]
        if val:
            acc_ax.plot(
                [v[0] for v in val],
                [v[1] for v in val],
                marker="o",
                markersize=3,
                color=_colour(i),
            )
    styles = [Line2D([], [], color="#555555", marker="o", markersize=3, label="val top-1"),
              Line2D([], [], color="#555555", linestyle="--", marker="x", markersize=4,
                     linewidth=1, label="train top-1")]
    loss_ax.set(title="Train loss", xlabel="epoch", ylabel="loss")
    acc_ax.set(title="Top-1 per epoch", xlabel="epoch", ylabel="top-1 (%)")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        ax.grid(True, alpha=0.3)
    # As many columns as names of this length fit across the figure (~6 px a character).
    longest = max(len(h.get_label()) for h in [*handles, *styles])
    columns = max(1, min(len(handles) + 2, 1000 // (6 * longest + 40)))
    fig.legend(handles=[*handles, *styles], loc="outside lower center", ncols=columns,
               fontsize=8, frameon=False)
    names = ", ".join(s.name for _, s in trained)
    alt = f"Train loss and top-1 per epoch for {names}"
    if single:
        alt += (f"; trained one epoch, so no curve (see the history tables): "
                f"{', '.join(single)}")
    return Plot("training", "Training curves", alt, figure_png(fig))


def all_plots(
    stages: Sequence[StageRecord],
    budget: float | None,
    pruning: Sequence[Plot],
    reference: int | None,
) -> list[Plot]:
    """Every plot that has data, in the order the report shows them; ``reference`` is the
    reference stage's position in ``stages`` (marked, and the base of the changes).

    ``pruning`` (:func:`netshrink.report.prune_plots.pruning_plots`) go before the
    training curves: they are about the models, the curves about how they were made.
    """
    made = [
        top1_bar(stages, budget, reference),
        size_vs_accuracy(stages, reference),
        *latency_vs_accuracy(stages, reference),
        *pruning,
        training_curves(stages),
    ]
    return [p for p in made if p is not None]
