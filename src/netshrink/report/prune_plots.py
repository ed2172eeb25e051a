"""The report's pruning plots: weights before/after, top-1 vs fraction pruned, sensitivity.

They draw what :mod:`netshrink.report.stage_files` read beside the models, through the
same figure builders the pruning stages use (:mod:`netshrink.prune.plots`), so a plot in
the report and the PNG a stage left in its folder cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def _pruned_model(name: str, stages: Mapping[str, StageRecord], inputs: Mapping[str, str]
                  ) -> str:
    """The stage whose model the stage ``name`` pruned: its input, or, where that is a
    scan (which hands on the model it was given), the scan's input."""
    start = inputs.get(name, "")
    while start in stages and stages[start].kind in _NOT_PRUNING and start in inputs:
        start = inputs[start]
    return start


def accuracy_vs_pruned(
    stages: Sequence[StageRecord], files: RunFiles, budget: float | None,
    reference: int | None, inputs: Mapping[str, str],
) -> Plot | None:
    """Top-1 against the fraction of its own input's parameters each pruning stage removed.

    A stage is measured against the model it pruned (``inputs``: each stage's name to the
    stage it started from), never against the reference: a ResNet-18 student pruned
    after a distillation from a ResNet-50 teacher removed what it removed from the
    ResNet-18, and the distillation, a change of architecture, is no pruning. x is
    measured (1 − non-zero params / the input's non-zero params), so magnitude pruning
    (zeros) and channel pruning (fewer params) share an axis. One line per pruning kind
    and input, from the input at 0; the reference (position ``reference`` in ``stages``)
    and the accuracy budget are level lines. A search stage adds its bisection probes,
    at their nominal ratio and on the subset it searched on, labelled as such.
    """
    ref = stages[reference] if reference is not None else None
    base = ref.measurement if ref is not None else None
    if ref is None or base is None or base.accuracy is None:
        return None
    by_name = {s.name: s for s in stages}
    curves: dict[str, list[tuple[float, float]]] = {}
    named: list[tuple[str, float, float]] = []  # stage points, labelled on the plot
    said: list[str] = []
    unplaced: list[str] = []  # pruning stages whose input has no measured size or accuracy
    for s in stages:
        m = s.measurement
        if not is_pruning(s) or s.status != "done" or m is None or m.accuracy is None:
            continue
        start = by_name.get(_pruned_model(s.name, by_name, inputs))
        before = start.measurement if start is not None else None
        if start is None or before is None or before.accuracy is None \
                or before.nonzero_params <= 0:
            unplaced.append(s.name)
            continue
        removed = 1 - m.nonzero_params / before.nonzero_params
        label = f"{s.kind} of {start.name} ({m.accuracy.split} set)"
        curves.setdefault(literal_text(label), [(0.0, before.accuracy.top1)]).append(
            (removed, m.accuracy.top1))
        named.append((s.name, removed, m.accuracy.top1))
        said.append(f"{s.name} {removed:.1%} removed from {start.name}, "
                    f"top-1 {m.accuracy.top1:.2%}")
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
    fig = accuracy_vs_ratio(
        curves, baseline_top1=base.accuracy.top1,
        baseline_label=f"{literal_text(ref.name)} (reference)",
        tolerance_points=budget, tolerance_label="accuracy budget", title=title,
        xlabel="fraction of its input model's parameters removed "
               "(1 − non-zero / the input's non-zero)",
    )
    lowest = min(x for points in curves.values() for x, _ in points)
    if lowest < 0:  # a stage with more parameters left than its input: keep it in view
        fig.axes[0].set_xlim(left=lowest - 0.05)
    # which point is which stage, where a label fits (a search's dozens crowd)
    left_off = place_labels(fig.axes[0], [(x, 100 * y, literal_text(name))
                                          for name, x, y in named], fontsize=8)
    alt = f"{title}: each stage against the model it started from; {'; '.join(said)}"
    if unplaced:
        alt += f"; not placed (input not measured): {', '.join(unplaced)}"
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
    stages: Sequence[StageRecord], files: RunFiles, budget: float | None,
    reference: int | None, inputs: Mapping[str, str],
) -> list[Plot]:
    """The pruning plots that have data: accuracy vs fraction pruned, weights, scans.

    ``reference`` is the reference stage's position in ``stages`` (its top-1 a level
    line); ``inputs`` name the stage each stage started from (the base of its fraction).
    """
    made = [accuracy_vs_pruned(stages, files, budget, reference, inputs),
            weights_plot(files.weights)]
    return [p for p in made if p is not None] + sensitivity_plots(stages, files)
