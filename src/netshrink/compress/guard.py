"""The compress search's statistical guard: how much a candidate may have lost, not just
how much it lost on the images at hand.

A drop in top-1 measured on ``n`` images is an estimate. Two models evaluated on the
same images differ only on the images where they disagree, so the per-image hits
(``Accuracy.correct``) give a much tighter bound on the difference than the two top-1
figures alone; without them the bound assumes the worst the two figures allow.

- ``drop_bound``: the point drop and its one-sided upper confidence bound.
- ``split_warning``: a plain warning when the validation split is too small for the
  budget to be resolved at all.
- ``compress_headline``: the first line of every compress report, the test figure first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

from netshrink.bench.schema import Accuracy
from netshrink.errors import UserError

__all__ = ["DEFAULT_CONFIDENCE", "TYPICAL_DISAGREEMENT", "DropEstimate", "compress_headline",
           "drop_bound", "images_to_resolve", "resolution_points", "split_warning"]

DEFAULT_CONFIDENCE = 0.9
# The share of images on which a compressed candidate and its input model disagree, used
# to say what a split can resolve. Measured on the digits case (the old search's 19
# candidates against a ResNet-18 on 143 validation images,
# benchmarks/results/compress_digits.md): 2.1% to 6.3%, median 4.2%. A model pruned and
# fine-tuned is right on images its input got wrong as well as the reverse, so even the
# candidates that keep top-1 exactly move a few percent of the predictions.
TYPICAL_DISAGREEMENT = 0.04

Method = Literal["paired", "worst-case", "independent"]


@dataclass(frozen=True)
class DropEstimate:
    """How much top-1 a candidate lost against a reference, in percentage points.

    ``drop_points`` is the observed drop (positive: the candidate is worse);
    ``upper_points`` the one-sided upper bound at ``confidence``: the drop on new images
    like these is below it with that confidence. ``losses`` / ``gains``: the images the
    reference got right and the candidate wrong / the reverse (paired only, else None).
    """

    drop_points: float
    upper_points: float
    confidence: float
    images: int
    method: Method
    losses: int | None = None
    gains: int | None = None

    @property
    def paired(self) -> bool:
        return self.method == "paired"

    @property
    def discordant(self) -> int | None:
        """Images on which the two models disagree (paired only)."""
        return None if self.losses is None or self.gains is None else self.losses + self.gains

    def within(self, budget_points: float) -> bool:
        """Whether the drop is within ``budget_points`` at this confidence: its upper
        bound is, not merely its point estimate."""
        return self.upper_points <= budget_points + 1e-9

    def describe(self) -> str:
        """``-0.56 points (the drop at most 0.93 at 90% confidence; 360 images, paired:
        9 lost, 7 gained)``."""
        how = (f"paired: {self.losses} lost, {self.gains} gained" if self.paired
               else f"{self.method}: no per-image hits")
        return (f"{_change(self.drop_points)} (the drop at most {self.upper_points:.2f} "
                f"at {self.confidence:.0%} confidence; {self.images:,} images, {how})")


def _z(confidence: float) -> float:
    if isinstance(confidence, bool) or not 0.5 < confidence < 1:
        raise UserError(f"confidence {confidence!r}: give a fraction between 0.5 and 1 "
                        "(e.g. 0.9)")
    return NormalDist().inv_cdf(confidence)


def _score(losses: float, gains: float, n: int, d: float) -> float:
    """Tango's score statistic for a paired difference of ``d`` (see ``drop_bound``)."""
    b, c = losses, gains
    slope = -b - c + (2 * n - b + c) * d  # B of the quadratic 2n q^2 + B q + C = 0
    const = -c * d * (1 - d)  # C
    q = (-slope + math.sqrt(max(slope * slope - 8 * n * const, 0.0))) / (4 * n)
    var = n * (2 * q + d * (1 - d))
    num = b - c - n * d
    if var <= 0:
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def _paired_upper(losses: float, gains: float, n: int, z: float) -> float:
    """Tango's score upper bound (a fraction) on the mean of per-image differences: the
    largest difference ``d`` the statistic does not reject, ``score(d) >= -z``."""
    lo, hi = (losses - gains) / n, 1.0
    if losses >= n:
        return 1.0
    for _ in range(60):  # bisection: the statistic falls as d grows; 2^-60 of a point
        mid = (lo + hi) / 2
        if _score(losses, gains, n, mid) >= -z:
            lo = mid
        else:
            hi = mid
    return hi


def drop_bound(ref: Accuracy, cand: Accuracy, confidence: float = DEFAULT_CONFIDENCE
               ) -> DropEstimate:
    """The drop of ``cand``'s top-1 below ``ref``'s and its one-sided upper bound.

    **Paired** (both carry ``correct`` on the same split and number of images, so the same
    images in the same order): each image gives a difference ``d_i`` = ref right - cand
    right, in {-1, 0, 1}; the drop is their mean. Only the discordant images carry
    information: ``b`` (ref right, cand wrong) and ``c`` (the reverse). The bound is
    Tango's asymptotic score bound for matched proportions (Statistics in Medicine 17,
    1998, 891-908), the largest drop ``d`` that the score statistic does not reject:

        Z(d) = (b - c - n d) / sqrt(n (2 q(d) + d (1 - d))),   upper: Z(d) = -z,
        q(d) = (sqrt(B^2 - 8 n C) - B) / (4 n),  B = -b - c + (2n - b + c) d,
                                                 C = -c d (1 - d),

    ``q(d)`` being the chance of a gain that is most likely given a drop of ``d`` (its
    maximum-likelihood estimate under that constraint), ``z`` the normal quantile at
    ``confidence``; found by bisection.

    Why this one: the plain Wald bound, ``(b - c)/n + z sqrt(b + c - (b - c)^2/n) / n``,
    has zero width when the two models agree on every image (b = c = 0), claiming a
    certainty 143 images cannot give, and too little when a candidate only loses. The
    score bound keeps ``z^2 / (n + z^2)`` there (1.14 points on 143 images, 0.03 on 5,000
    at 90%), and its coverage is close to nominal where a guard needs it: simulated at
    90%, 20,000 draws each, a candidate losing 1% or 2% of 143 images and gaining none is
    bounded 100% and 94% of the time (the Agresti-Min adjusted Wald bound: 77% and 79%,
    accepting a harmful candidate twice as often as it should), and over 24 settings (143,
    359 and 5,000 images; discordance 0.1% to 7%) the score bound covered 87% to 100%.

    **Unpaired** (no hits on one side): on the same split and images, the same bound with
    the most disagreement the two top-1 figures allow, ``b + c = min(p_r + p_c,
    2 - p_r - p_c)``: the bound grows with ``b + c`` at a fixed ``b - c``, so it is never
    below the paired bound of any image-by-image outcome with these figures
    (``worst-case``). On different numbers of images, the Agresti-Caffo bound for two
    independent samples (one right and one wrong image added to each), conservative for
    the positively correlated outcomes of two models on overlapping images
    (``independent``).

    The upper bound is never below the observed drop.

    Raises:
        UserError: the two were measured on different splits, or ``confidence`` is not
            in (0.5, 1).
    """
    z = _z(confidence)
    if ref.split != cand.split:
        raise UserError(f"cannot compare top-1 on the {ref.split!r} split with top-1 on the "
                        f"{cand.split!r} split; measure both on one split")
    drop = (ref.top1 - cand.top1) * 100
    n = ref.images
    if ref.images == cand.images:
        ref_hits, cand_hits = ref.hits(), cand.hits()
        if ref_hits is not None and cand_hits is not None:
            losses = int((ref_hits & ~cand_hits).sum())
            gains = int((~ref_hits & cand_hits).sum())
            upper = _paired_upper(losses, gains, n, z) * 100
            return DropEstimate(drop, max(drop, upper), confidence, n, "paired", losses, gains)
        most = min(ref.top1 + cand.top1, 2 - ref.top1 - cand.top1)  # b + c, as fractions
        diff = ref.top1 - cand.top1
        upper = _paired_upper(n * (most + diff) / 2, n * (most - diff) / 2, n, z) * 100
        return DropEstimate(drop, max(drop, upper), confidence, n, "worst-case")
    p1 = (ref.top1 * ref.images + 1) / (ref.images + 2)
    p2 = (cand.top1 * cand.images + 1) / (cand.images + 2)
    se = math.sqrt(p1 * (1 - p1) / (ref.images + 2) + p2 * (1 - p2) / (cand.images + 2))
    upper = (p1 - p2 + z * se) * 100
    return DropEstimate(drop, max(drop, upper), confidence, min(ref.images, cand.images),
                        "independent")


def resolution_points(images: int, confidence: float = DEFAULT_CONFIDENCE,
                      disagreement: float = TYPICAL_DISAGREEMENT) -> float:
    """The upper bound (points) of a candidate that keeps top-1 exactly but changes
    ``disagreement`` of the predictions (half lost, half gained), on ``images`` images:
    the smallest budget such a candidate can be shown within. 90%, 4%: 2.40 points on
    143 images, 0.36 on 5,000."""
    half = disagreement * images / 2
    return _paired_upper(half, half, images, _z(confidence)) * 100


def images_to_resolve(budget_points: float, confidence: float = DEFAULT_CONFIDENCE,
                      disagreement: float = TYPICAL_DISAGREEMENT) -> int | None:
    """The fewest validation images on which ``resolution_points`` is within
    ``budget_points`` (1 point at 90%: 693); None for a budget no split resolves (0)."""
    if budget_points <= 0:
        return None
    lo, hi = 1, 2
    while resolution_points(hi, confidence, disagreement) > budget_points:
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            return None
    while lo < hi:  # resolution_points falls as the images grow
        mid = (lo + hi) // 2
        if resolution_points(mid, confidence, disagreement) > budget_points:
            lo = mid + 1
        else:
            hi = mid
    return lo


def split_warning(images: int, budget_points: float,
                  confidence: float = DEFAULT_CONFIDENCE) -> str | None:
    """A plain-words warning when ``images`` validation images cannot resolve a budget
    of ``budget_points``, else None.

    One image is ``100 / images`` points, and a candidate that changes a few percent of
    the predictions (``TYPICAL_DISAGREEMENT``) while keeping top-1 is uncertain by
    ``resolution_points``: at 90% confidence, on 5,000 images 0.02 and 0.36 points (a
    1-point budget resolved), on 143 images 0.70 and 2.40 points (not). The warning says
    what the guard does (a candidate counts as within the budget only when the upper bound
    of its drop is) and what the user can do (a larger validation split, or a larger
    budget), with the figures for this split.
    """
    if images < 1:
        raise UserError(f"the validation split has {images} images; give it some "
                        "(--val-size)")
    one = 100 / images
    spread = resolution_points(images, confidence)
    if spread <= budget_points and one <= budget_points:
        return None
    needed = images_to_resolve(budget_points, confidence)
    wider = math.ceil(max(spread, one) * 10) / 10
    default = ("" if images >= 5000 else
               f" (on 5,000 images: {100 / 5000:.2f} and "
               f"{resolution_points(5000, confidence):.2f} points)")
    if needed is None:
        return (f"a {budget_points:g}-point budget: a candidate counts as within it only "
                f"when the upper {confidence:.0%} bound of its drop is 0 or below, i.e. "
                f"when it is shown more accurate than the input model on the "
                f"{images:,} validation images, which compressed models rarely are; give a "
                f"budget (--budget-points 1, say) to let the search trade accuracy away.")
    split = (f"a validation split of {needed:,} images or more (--val-size {needed}; "
             "compress decides on the input model's own held-out images when its file "
             f"records them, so train it with data.val_size {needed})")
    return (f"the validation split has {images:,} images, too few to resolve a "
            f"{budget_points:g}-point budget: one image is {one:.2f} points, and a candidate "
            f"that changes {TYPICAL_DISAGREEMENT:.0%} of the predictions while keeping "
            f"top-1 is uncertain by up to {spread:.2f} points at {confidence:.0%} "
            f"confidence{default}. A candidate counts as within the budget only when the "
            f"upper {confidence:.0%} bound of its drop is, so on these images few or no "
            f"candidates will; for more, give {split}, or a larger budget "
            f"(--budget-points {wider:g} is resolved on {images:,} images).")


def _change(drop_points: float) -> str:
    """``-0.56 points``: the change in top-1, never ``-0.00``."""
    return f"{round(-drop_points, 2) + 0.0:+.2f} points"


def _ratio(ref: float | None, new: float | None) -> float | None:
    return ref / new if ref and new else None


def _test_part(chosen: str, budget: float, ref: Accuracy | None, cand: Accuracy | None,
               confidence: float) -> str:
    if ref is None or cand is None:
        return f"Chosen {chosen}; not measured on the test split"
    est = drop_bound(ref, cand, confidence)
    if est.within(budget):
        verdict = f"within the {budget:g}-point budget on test"
    elif est.drop_points <= budget + 1e-9:
        verdict = (f"within the {budget:g}-point budget on test by its point estimate "
                   "only, not at this confidence")
    else:
        verdict = f"NOT within the {budget:g}-point budget on test"
    return (f"Test: {chosen} {cand.top1:.2%} top-1 against the input model's "
            f"{ref.top1:.2%}, {_change(est.drop_points)}, {verdict} (the drop at "
            f"most {est.upper_points:.2f} points at {confidence:.0%} confidence, "
            f"{est.images:,} test images never used to decide)")


def compress_headline(*, chosen: str | None, budget_points: float,
                      ref_test: Accuracy | None = None, chosen_test: Accuracy | None = None,
                      ref_val: Accuracy | None = None, chosen_val: Accuracy | None = None,
                      ref_size_bytes: int | None = None,
                      chosen_size_bytes: int | None = None,
                      ref_p50_ms: float | None = None, chosen_p50_ms: float | None = None,
                      runtime: str | None = None, against: str = "the input model",
                      speed_how: str | None = None,
                      confidence: float = DEFAULT_CONFIDENCE,
                      why_none: str | None = None) -> str:
    """The first line of a compress report.

    With a pick (``chosen``, the candidate's name): its TEST figure against the input
    model on the test split (top-1, the change in points, whether within the budget on
    test with its own upper bound), then its validation figure (what decided), then its
    size and batch-1 latency (p50, in ``runtime``) against ``ref_size_bytes`` and
    ``ref_p50_ms``, which are ``against``'s (the input model's file, or e.g. "the dense
    model's INT8 in openvino" when the caller times that); ``speed_how``: how the two
    were timed (e.g. "timed side by side at the end of the search"), stated with both
    p50s. Every argument but ``chosen`` and
    ``budget_points`` may be None, and what it feeds is left out (or said to be missing).
    Without a pick: that nothing was chosen, with ``why_none`` (e.g. "no candidate's
    upper bound stayed within the budget on the validation split") and the input model's
    test top-1 when given.
    """
    if chosen is None:
        line = (f"Nothing chosen: {why_none or 'no candidate stayed within the budget'}"
                f" ({budget_points:g}-point budget); there is no file to deploy")
        if ref_test is not None:
            line += f"; the input model: {ref_test.top1:.2%} top-1 on test"
        return line + "."
    parts = [_test_part(chosen, budget_points, ref_test, chosen_test, confidence)]
    if ref_val is not None and chosen_val is not None:
        est = drop_bound(ref_val, chosen_val, confidence)
        parts.append(f"validation: {chosen_val.top1:.2%} against {ref_val.top1:.2%}, "
                     f"{_change(est.drop_points)} (the drop at most "
                     f"{est.upper_points:.2f}, {est.images:,} images)")
    ratios = []
    if (size := _ratio(ref_size_bytes, chosen_size_bytes)) is not None:
        ratios.append(f"{size:.2f}x smaller ({chosen_size_bytes:,} B)")
    if (speed := _ratio(ref_p50_ms, chosen_p50_ms)) is not None:
        where = f" in {runtime}" if runtime else ""
        how = f" against {ref_p50_ms:.3f} ms, {speed_how}" if speed_how else ""
        ratios.append(f"{speed:.2f}x the batch-1 speed{where} "
                       f"(p50 {chosen_p50_ms:.3f} ms{how})")
    if ratios:
        parts.append(" and ".join(ratios) + f" against {against}")
    return "; ".join(parts) + "."
