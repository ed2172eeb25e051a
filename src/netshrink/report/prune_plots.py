"""The report's pruning plots: weights before/after, top-1 vs fraction pruned, sensitivity.

They draw what :mod:`netshrink.report.stage_files` read beside the models, through the
same figure builders the pruning stages use (:mod:`netshrink.prune.plots`), so a plot in
the report and the PNG a stage left in its folder cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

from netshrink.figures import figure_png, place_labels
from netshrink.prune.plots import accuracy_vs_ratio, sensitivity_bars, weight_histogram
from netshrink.report.plots import Plot, literal_text
from netshrink.report.stage_files import RunFiles, WeightPair
from netshrink.stages.record import StageRecord

# The scan stage only looks (its model is the one it was given): not a point on a curve.
_NOT_PRUNING = {"prune.sensitivity"}
# Whole-network weights have a long tail; the histogram's range is this quantile of
# |weight|, so the bulk around zero is not squeezed into a few bins.
CLIP_QUANTILE = 0.999


def is_pruning(stage: StageRecord) -> bool:
    """Whether ``stage`` returns a pruned model (every ``prune.*`` kind but the scan)."""
    return stage.kind.startswith("prune.") and stage.kind not in _NOT_PRUNING


def weights_plot(pair: WeightPair | None) -> Plot | None:
    """All conv/linear weights of the reference against those of the last torch model."""
    if pair is None:
        return None
    title = f"Conv/linear weights: {pair.before_stage} vs {pair.after_stage}"
    fig = weight_histogram(
        pair.before, pair.after, title=literal_text(title), bins=120,
        labels=(literal_text(pair.before_stage), literal_text(pair.after_stage)),
        clip_quantile=CLIP_QUANTILE,
    )
    zeros = [float((t == 0).sum()) / max(1, t.numel()) for t in (pair.before, pair.after)]
    alt = (f"{title}: exact zeros {zeros[0]:.1%} of {pair.before.numel():,} weights before, "
           f"{zeros[1]:.1%} of {pair.after.numel():,} after (log-scale counts)")
    return Plot("weights", title, alt, figure_png(fig))


def accuracy_vs_pruned(
    stages: Sequence[StageRecord], files: RunFiles, budget: float | None, reference: int | None
) -> Plot | None:
    """Top-1 against the fraction of the reference's parameters each pruning stage removed.

    One line per pruning kind, each from the reference (position ``reference`` in
    ``stages``) at 0; x is measured (1 − non-zero params / reference params), so
    magnitude pruning (zeros) and channel pruning (fewer params) share an axis, and a
    pruned student is placed against its teacher when the teacher is the reference. A
    search stage adds its bisection probes, at their nominal ratio and on the subset it
    searched on, labelled as such.
    """
    ref = stages[reference] if reference is not None else None
    base = ref.measurement if ref is not None else None
    if ref is None or base is None or base.accuracy is None or base.params <= 0:
        return None
    base_top1 = base.accuracy.top1
    curves: dict[str, list[tuple[float, float]]] = {}
    named: list[tuple[str, float, float]] = []  # stage points, labelled on the plot
    said: list[str] = []
    for s in stages:
        m = s.measurement
        if (s is ref or not is_pruning(s) or s.status != "done" or m is None
                or m.accuracy is None):
            continue
        removed = 1 - m.nonzero_params / base.params
        label = f"{s.kind} stages ({m.accuracy.split} set)"
        curves.setdefault(label, [(0.0, base_top1)]).append((removed, m.accuracy.top1))
        named.append((s.name, removed, m.accuracy.top1))
        said.append(f"{s.name} {removed:.1%} removed, top-1 {m.accuracy.top1:.2%}")
    for s in stages:
        found = files.stages.get(s.index)
        r = found.search if found is not None else None
        if r is None:
            continue
        label = (f"{s.name}: {len(r.probes)} search probes ({r.method}, {r.scope}; "
                 f"{r.split} subset; x = nominal ratio)")
        curves[literal_text(label)] = [(0.0, r.baseline_top1),
                                       *((p.ratio, p.top1) for p in r.probes)]
        said.append(f"{s.name} searched {len(r.probes)} ratios, answer {r.ratio:.3f}")
    if not curves:
        return None
    title = "Top-1 vs fraction pruned"
    name = literal_text(ref.name)
    fig = accuracy_vs_ratio(
        curves, baseline_top1=base_top1, baseline_label=f"{name} (reference)",
        tolerance_points=budget, tolerance_label="accuracy budget", title=title,
        xlabel=f"fraction of the parameters of {name} removed (1 − non-zero / {name} params)",
    )
    lowest = min(x for points in curves.values() for x, _ in points)
    if lowest < 0:  # a stage with more parameters left than the reference: keep it in view
        fig.axes[0].set_xlim(left=lowest - 0.05)
    # which point is which stage, where a label fits (a search's dozens crowd)
    left_off = place_labels(fig.axes[0], [(x, 100 * y, literal_text(name))
                                          for name, x, y in named], fontsize=8)
    alt = f"{title}: x against {ref.name} (the reference); {'; '.join(said)}"
    if left_off:
        alt += f"; {left_off} of {len(named)} stage points left unlabelled for room"
    return Plot("accuracy_vs_pruned", title, alt, figure_png(fig))


def sensitivity_plots(stages: Sequence[StageRecord], files: RunFiles) -> list[Plot]:
    """Each sensitivity scan's per-layer (or per-group) top-1 drop, as bars."""
    plots = []
    for s in stages:
        found = files.stages.get(s.index)
        scan = found.sensitivity if found is not None else None
        if scan is None:
            continue
        unit = "layer" if scan.method == "magnitude" else "channel group"
        title = (f"{s.name}: {scan.method} sensitivity, each {unit} pruned alone at "
                 f"{scan.ratio:g} ({scan.split} split)")
        rows = [r.model_dump() for r in scan.rows]
        fig = sensitivity_bars(rows, ratio=scan.ratio, title=literal_text(title))
        worst = sorted((r for r in scan.rows if r.kind != "baseline"), key=lambda r: -r.drop)
        alt = f"{title}; most sensitive: " + ", ".join(
            f"{r.layer} (-{100 * r.drop:.1f} points)" for r in worst[:3]
        )
        plots.append(Plot(f"sensitivity_{s.index:02d}", title, alt, figure_png(fig)))
    return plots


def pruning_plots(
    stages: Sequence[StageRecord], files: RunFiles, budget: float | None, reference: int | None
) -> list[Plot]:
    """The pruning plots that have data: accuracy vs fraction pruned, weights, scans.

    ``reference`` is the reference stage's position in ``stages``: the base of the
    fraction pruned (the weight histogram's "before" was read as that stage's file).
    """
    made = [accuracy_vs_pruned(stages, files, budget, reference), weights_plot(files.weights)]
    return [p for p in made if p is not None] + sensitivity_plots(stages, files)
