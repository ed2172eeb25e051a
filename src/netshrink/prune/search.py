"""How far can we prune? An accuracy-budget search, and a sensitivity-guided allocation.

``search_max_ratio`` bisects for the largest pruning ratio whose top-1 stays within a
tolerance of the unpruned model's. Bisection **assumes accuracy falls monotonically as
the ratio rises**: roughly true for magnitude and channel pruning of a trained network,
but a probe measured on a small subset is noisy, and fine-tuning per probe can make the
curve bumpy. The answer is then *a* ratio within tolerance with a failing probe just
above it, not necessarily the largest such ratio; every probe is returned so the curve
can be checked (``monotone`` says whether the probes themselves contradict the
assumption).

``allocate_by_sensitivity`` turns a per-layer sensitivity scan into non-uniform per-layer
ratios: layers whose pruning costs little accuracy (and large layers, where a weight
costs less) are pruned more, sensitive ones less, with exactly as many weights zeroed in
total as a uniform layer-wise ratio would.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor, nn

from netshrink.bench.accuracy import evaluate
from netshrink.data.base import Split
from netshrink.errors import UserError
from netshrink.models.select import prunable_layers
from netshrink.prune.magnitude import MagnitudePruneConfig, magnitude_masks, prune_magnitude
from netshrink.prune.sensitivity import (
    BASELINE,
    Method,
    check_method,
    check_ratio,
    check_split,
    example_input_from,
    prune_channel_groups,
)
from netshrink.train.masks import apply_masks

__all__ = [
    "MONOTONE_ASSUMPTION",
    "allocate_by_sensitivity",
    "prune_at_ratio",
    "prune_with_allocation",
    "search_max_ratio",
    "within_tolerance",
]

Finetune = Callable[[nn.Module], object]

MONOTONE_ASSUMPTION = (
    "bisection assumes top-1 falls monotonically as the ratio rises; the answer is a ratio "
    "within tolerance with a failing probe just above it"
)

# Float slack when comparing an accuracy drop with the tolerance: 0.97 - 0.96 is
# 0.010000000000000009, which must count as 1 point, not more.
_SLACK = 1e-9


def within_tolerance(top1: float, baseline: float, tolerance_points: float) -> bool:
    """Whether ``top1`` (a fraction) is at most ``tolerance_points`` below ``baseline``."""
    return (baseline - top1) * 100.0 <= tolerance_points + _SLACK


def prune_at_ratio(
    model: nn.Module,
    ratio: float,
    *,
    method: Method = "magnitude",
    scope: Literal["layer", "global"] = "layer",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    example_input: Tensor | None = None,
) -> nn.Module:
    """A copy of ``model`` pruned at one ratio with ``method`` (the caller's is unchanged).

    Args:
        model: the model to prune.
        ratio: fraction of weights (magnitude) or of each group's channels (channel).
        method: ``magnitude`` (unstructured, ``scope`` layer or global) or ``channel``
            (each coupled group loses its lowest-L1 channels; ``layer`` scope only).
        scope: see ``MagnitudePruneConfig``.
        include / exclude: layer-name patterns.
        example_input: a batch to trace the model with; needed for ``channel``.

    Returns:
        The pruned copy, in eval mode.

    Raises:
        UserError: unknown method, bad ratio or pattern, ``channel`` with global scope
            or without an example input.
    """
    check_method(method)
    check_ratio(ratio)
    if method == "magnitude":
        cfg = MagnitudePruneConfig(ratio=ratio, scope=scope, include=include, exclude=exclude)
        return prune_magnitude(model, cfg)[0]
    if scope != "layer":
        raise UserError("channel pruning in the search takes scope: layer (every coupled "
                        "group loses the same fraction); use prune.channel for global scope")
    if example_input is None:
        raise UserError("channel pruning needs an example input to trace the model with")
    return prune_channel_groups(model, ratio, example_input, include=include, exclude=exclude)


def search_max_ratio(
    model: nn.Module,
    data_split: Split,
    *,
    method: Method = "magnitude",
    tolerance_points: float = 1.0,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    scope: Literal["layer", "global"] = "layer",
    lo: float = 0.0,
    hi: float = 0.99,
    iterations: int = 7,
    max_images: int | None = 2000,
    finetune: Finetune | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    example_input: Tensor | None = None,
    split_name: str = "val",
) -> dict[str, Any]:
    """Bisect for the largest ratio whose top-1 is within ``tolerance_points`` of the original.

    ``hi`` is probed first (if it passes, it is the answer); otherwise ``iterations``
    bisection steps narrow ``[lo, hi]``, and the answer is the last ratio that passed.
    Ratio 0 is the unpruned model and needs no probe; a ``lo`` above 0 is probed, and if
    it fails the search falls back to ``[0, lo]``. Bisection assumes top-1 falls
    monotonically with the ratio (see the module docstring).

    Args:
        model: the trained model (not changed).
        data_split: where top-1 is measured (a validation split).
        method: ``magnitude`` or ``channel``.
        tolerance_points: the largest allowed top-1 drop, in percentage points.
        include / exclude: layer-name patterns.
        scope: ``layer`` or ``global`` (magnitude only).
        lo / hi: the ratio interval, 0 <= lo < hi < 1.
        iterations: bisection steps after the ``hi`` probe.
        max_images: evaluate on the first this many images (None: all).
        finetune: ``finetune(pruned_copy)`` trains a probe's copy in place before it is
            measured (short fine-tuning per probe); None to measure one-shot pruning.
        device: where to run.
        batch_size: evaluation batch size.
        example_input: a batch to trace with (``channel``); default: the split's first image.
        split_name: the split's name, for records and messages.

    Returns:
        ``{"method", "scope", "tolerance_points", "baseline_top1", "ratio", "top1",
        "probes": [{"ratio", "top1", "kept"}, ...] (in probe order), "iterations",
        "finetuned", "monotone", "assumption", "model"}``: ``ratio`` is the answer,
        ``top1`` its accuracy, ``model`` the pruned (and fine-tuned) copy at that ratio
        (the unpruned copy when the answer is 0). Everything but ``model`` is JSON-ready.

    Raises:
        UserError: unknown method, negative tolerance, a bad interval or iteration count,
            an empty split, a bad pattern.
    """
    check_method(method)
    check_split(data_split, split_name)
    if not isinstance(tolerance_points, (int, float)) or not tolerance_points >= 0:
        raise UserError(f"tolerance_points must be 0 or more (a top-1 drop in percentage "
                        f"points), not {tolerance_points!r}")
    check_ratio(lo, "lo")
    check_ratio(hi, "hi")
    if not lo < hi:
        raise UserError(f"the search interval needs lo < hi; got lo={lo}, hi={hi}")
    if iterations < 1:
        raise UserError(f"iterations must be at least 1, not {iterations}")
    if scope not in ("layer", "global"):
        raise UserError(f"scope must be 'layer' or 'global', not {scope!r}")
    base_model = copy.deepcopy(model).to(device).eval()
    if method == "channel" and example_input is None:
        example_input = example_input_from(data_split, device)

    def top1(m: nn.Module) -> float:
        return evaluate(m, data_split, batch_size=batch_size, device=device,
                        max_images=max_images, split_name=split_name).top1

    baseline = top1(base_model)
    probes: list[dict[str, Any]] = []
    best: dict[str, Any] = {"ratio": 0.0, "top1": baseline, "model": base_model}

    def probe(ratio: float) -> bool:
        pruned = prune_at_ratio(base_model, ratio, method=method, scope=scope,
                                include=include, exclude=exclude, example_input=example_input)
        if finetune is not None:
            finetune(pruned)
            pruned.eval()
        acc = top1(pruned)
        kept = within_tolerance(acc, baseline, tolerance_points)
        probes.append({"ratio": ratio, "top1": acc, "kept": kept})
        if kept and ratio >= best["ratio"]:
            best.update(ratio=ratio, top1=acc, model=pruned)
        return kept

    if lo > 0 and not probe(lo):
        lo, hi = 0.0, lo  # the hint was too high: search below it
    if not probe(hi):
        for _ in range(iterations):
            mid = (lo + hi) / 2
            if probe(mid):
                lo = mid
            else:
                hi = mid
    by_ratio = sorted(probes, key=lambda p: p["ratio"])
    monotone = all(a["top1"] >= b["top1"] for a, b in itertools.pairwise(by_ratio))
    return {
        "method": method, "scope": scope, "tolerance_points": tolerance_points,
        "split": split_name, "max_images": max_images, "baseline_top1": baseline,
        "ratio": best["ratio"], "top1": best["top1"], "probes": probes,
        "iterations": iterations, "finetuned": finetune is not None,
        "monotone": monotone, "assumption": MONOTONE_ASSUMPTION, "model": best["model"],
    }


# --------------------------------------------------------------------------- allocation


def _ratios(sens: list[float], sizes: list[int], zeros_total: float, cap: float,
            exponent: float) -> list[float]:
    """Per-layer ratios ``clip(c * w_l, 0, cap)`` that zero ``zeros_total`` weights in all.

    ``w_l = (n_l / s_l) ** (1 / (exponent - 1))`` minimises the predicted total drop
    ``sum(s_l * r_l ** exponent)`` for a fixed number of zeroed weights ``sum(r_l * n_l)``
    (Lagrange: ``exponent * s_l * r_l ** (exponent - 1)`` proportional to ``n_l``). The scale
    ``c`` is found by bisection: the zeroed total rises monotonically with it.
    """
    logs = [math.log(n / s) / (exponent - 1) for n, s in zip(sizes, sens, strict=True)]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]  # in (0, 1]: no overflow for any size

    def zeroed(c: float) -> float:
        return sum(min(cap, c * w) * n for w, n in zip(weights, sizes, strict=True))

    lo, hi = 0.0, 1.0
    while zeroed(hi) < zeros_total and hi < 1e300:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if zeroed(mid) < zeros_total else (lo, mid)
    return [min(cap, hi * w) for w in weights]


def allocate_by_sensitivity(
    model: nn.Module,
    scan_rows: list[dict[str, Any]],
    target_sparsity: float,
    *,
    max_ratio: float = 0.98,
    exponent: float = 5.0,
) -> dict[str, float]:
    """Per-layer ratios guided by a magnitude sensitivity scan, as many zeros as uniform.

    The uniform layer-wise ratio ``t`` = ``target_sparsity`` zeroes
    ``Z = sum(round(t * n_l))`` weights over the scanned layers; this allocation zeroes
    exactly ``Z`` too, but unevenly. Each layer's drop is modelled as
    ``s_l * (r_l / r0) ** exponent`` (``s_l``: its scan drop at the scan ratio ``r0``;
    pruning hurts little at first and then steeply, hence a high power), and the ratios
    minimise the summed predicted drop for ``Z`` zeros: ``r_l`` proportional to
    ``(n_l / s_l) ** (1 / (exponent - 1))``. So a less sensitive layer is pruned more, and
    so is a larger one: removing a weight from it costs less accuracy per weight. Drops
    are clipped below at a quarter of the mean drop, so a layer whose drop was 0 (or
    negative) on a small subset counts as robust, not infinitely so. If no layer showed a
    drop, the scan says nothing and the allocation is the uniform one. No layer loses more
    than ``max_ratio``; fractions become whole weight counts (floors, then the remainder
    to the largest fractional parts), so the total is exact.

    Args:
        model: the model the scan was run on (for the layers' sizes; not changed).
        scan_rows: ``sensitivity_scan(..., method="magnitude")`` rows; the baseline row is
            skipped, every other row's layer is allocated.
        target_sparsity: the uniform ratio whose total is matched, in [0, 1).
        max_ratio: no layer loses more than this fraction of its weights.
        exponent: the power of the drop model (> 1); higher spreads the ratios less.

    Returns:
        ``{layer name: ratio}`` in scan order; ``round(ratio * n_l)`` of layer ``l`` is its
        whole number of zeroed weights.

    Raises:
        UserError: a bad ratio, cap or exponent, channel-group rows, a layer the model
            lacks, or a target the cap cannot reach.
    """
    check_ratio(target_sparsity, "target_sparsity")
    check_ratio(max_ratio, "max_ratio")
    if not exponent > 1:
        raise UserError(f"exponent must be above 1, not {exponent!r}")
    rows = [r for r in scan_rows if r.get("layer") != BASELINE and r.get("kind") != "baseline"]
    if not rows:
        raise UserError("the scan has no layer rows to allocate from")
    if any(r.get("kind") == "group" for r in rows):
        raise UserError("allocation takes a magnitude (per-layer) scan, not channel groups")
    layers = prunable_layers(model)
    missing = [r["layer"] for r in rows if r["layer"] not in layers]
    if missing:
        raise UserError(f"scan rows name layers the model lacks: {missing}")
    names = [r["layer"] for r in rows]
    sizes = [layers[n].weight.numel() for n in names]
    zeros_total = sum(round(target_sparsity * n) for n in sizes)
    caps = [math.floor(max_ratio * n) for n in sizes]
    if zeros_total > sum(caps):
        raise UserError(f"target_sparsity {target_sparsity} needs {zeros_total} zeros, more "
                        f"than max_ratio {max_ratio} allows ({sum(caps)}); raise max_ratio")
    drops = [max(0.0, float(r["drop"])) for r in rows]
    mean = sum(drops) / len(drops)
    if mean <= 0:
        return {n: round(target_sparsity * size) / size
                for n, size in zip(names, sizes, strict=True)}
    sens = [max(d, mean / 4) for d in drops]
    ratios = _ratios(sens, sizes, zeros_total, max_ratio, exponent)
    wanted = [r * n for r, n in zip(ratios, sizes, strict=True)]
    zeros = [min(cap, math.floor(w)) for w, cap in zip(wanted, caps, strict=True)]
    # Hand out the rounding remainder one weight at a time, largest fractional part first
    # (then the least sensitive), never past a layer's cap: the total comes out exact.
    order = sorted(range(len(names)), key=lambda i: (math.floor(wanted[i]) - wanted[i],
                                                     sens[i]))
    left = zeros_total - sum(zeros)
    while left > 0:
        for i in order:
            if left > 0 and zeros[i] < caps[i]:
                zeros[i] += 1
                left -= 1
    # Floors of a solution summing to Z cannot overshoot, but a float solution a hair
    # above Z could: take back from the most sensitive layers first.
    for i in sorted(range(len(names)), key=lambda i: -sens[i]):
        while left < 0 and zeros[i] > 0:
            zeros[i] -= 1
            left += 1
    return {n: z / size for n, z, size in zip(names, zeros, sizes, strict=True)}


def prune_with_allocation(model: nn.Module, allocation: dict[str, float]) -> nn.Module:
    """A copy of ``model`` with each named layer magnitude-pruned at its own ratio.

    Args:
        model: the model (not changed).
        allocation: ``{layer name: ratio in [0, 1)}``, e.g. from ``allocate_by_sensitivity``.

    Returns:
        The pruned copy, in eval mode; layer ``l`` has ``round(ratio_l * n_l)`` zeros.

    Raises:
        UserError: a name that is not a conv/linear layer of the model, or a bad ratio.
    """
    pruned = copy.deepcopy(model)
    layers = prunable_layers(pruned)
    unknown = [n for n in allocation if n not in layers]
    if unknown:
        raise UserError(f"allocation names layers the model lacks: {unknown}")
    for name, ratio in allocation.items():
        check_ratio(ratio, f"ratio of {name!r}")
        apply_masks(pruned, magnitude_masks({name: layers[name]}, ratio, "layer"))
    return pruned.eval()
