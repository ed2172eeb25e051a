"""Deep Compression's weight sharing: each layer's weights take one of 2**bits shared values.

Han, Mao & Dally (2016) cluster every conv/linear layer's weights with 1-D k-means and
store a small codebook of centroids plus a ``bits``-wide index per weight. Here only the
non-zero weights are clustered: a pruned weight stays exactly 0.0 and costs no cluster, so
pruning and sharing compose (the packed file keeps zeros in a bitmask, see
``netshrink.store.packed``). Centroids start evenly spaced between the layer's smallest
and largest weight, the initialisation Han et al. found best: it keeps centroids for the
rare large weights, which matter most, where density-based starts would spend them all on
the crowd near zero.

In one dimension k-means needs no distance matrix: the clusters of sorted centroids are
the intervals between consecutive midpoints. So the weights are sorted once, and every
Lloyd iteration finds each interval's bounds with a binary search and its mean from a
prefix sum: O(K log n) per iteration after one O(n log n) sort, which keeps a ResNet-50's
25M weights to seconds.

After sharing, ``CodebookHook`` fine-tunes the centroids through the one training loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from netshrink.errors import UserError
from netshrink.models.select import prunable_layers, select_layers
from netshrink.store.codebook import Codebook

__all__ = ["Codebook", "CodebookHook", "KMeansConfig", "kmeans_share"]

MIN_BITS, MAX_BITS = 1, 8  # indices are stored as uint8, so at most 256 shared values


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bits must be an integer from {MIN_BITS} to {MAX_BITS} "
            f"(2 to 256 shared values per layer), got {bits!r}"
        )
    return bits


class KMeansConfig(BaseModel):
    """Settings of k-means weight sharing.

    Attributes:
        bits: index width; each chosen layer keeps at most ``2**bits`` distinct non-zero
            values (1 to 8).
        include / exclude: layer-name patterns (``fc``, ``layer4.*``); all conv/linear
            layers by default.
        finetune_epochs: epochs of centroid fine-tuning after sharing (0: none).
        finetune_lr: the fine-tuning's learning rate.
        max_iter: Lloyd iterations at most per layer (they stop earlier once no weight
            changes cluster).
    """

    model_config = ConfigDict(extra="forbid")

    bits: int = 8
    include: list[str] = []
    exclude: list[str] = []
    finetune_epochs: float = Field(default=0, ge=0)
    finetune_lr: float = Field(default=0.01, gt=0)
    max_iter: int = Field(default=50, ge=1)

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, value: int) -> int:
        return _check_bits(value)


def _no_exact_zero(centroids: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float32 ``centroids`` through the weight dtype; move an exact 0.0 off zero.

    Rounding first makes the stored centroids equal the values the weights really get. A
    centroid of exactly 0.0 (a cluster whose members straddle zero and cancel) would turn
    live weights into "pruned" ones, which every later stage reads from exact zeros, so it
    becomes the dtype's smallest normal number instead: numerically nothing, but not zero.
    """
    rounded = centroids.to(dtype).float()
    tiny = torch.finfo(dtype).tiny
    return torch.where(rounded == 0, torch.full_like(rounded, tiny), rounded)


def _lloyd_1d(values: np.ndarray, k: int, max_iter: int) -> np.ndarray:
    """Centroids (float64, ascending) of 1-D k-means on sorted float64 ``values``.

    With no more distinct values than ``k``, the distinct values themselves (lossless).
    """
    distinct = 1 + int(np.count_nonzero(np.diff(values)))
    if distinct <= k:
        return np.unique(values)
    # Prefix sums turn each cluster's sum (and sum of squares) into two lookups; float64
    # keeps the sums of millions of small weights accurate.
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    squares = np.concatenate([[0.0], np.cumsum(values * values)])
    centroids = np.linspace(values[0], values[-1], k)
    last = None
    for _ in range(max_iter):
        bounds = _bounds(values, centroids)
        counts = np.diff(bounds)
        if not counts.all():
            # Pruning leaves a gap around zero where linearly spaced centroids find no
            # weight, and an empty cluster never gains one by itself: give its centroid
            # to the cluster with the largest squared error instead, split in two.
            centroids = _split_largest(values, bounds, prefix, squares)
            last = None
            continue
        if last is not None and np.array_equal(bounds, last):
            break  # no weight changed cluster: converged
        last = bounds
        centroids = (prefix[bounds[1:]] - prefix[bounds[:-1]]) / counts
    return centroids


def _split_largest(values: np.ndarray, bounds: np.ndarray, prefix: np.ndarray,
                   squares: np.ndarray) -> np.ndarray:
    """New centroids: the non-empty clusters' means, plus one more for each empty cluster,
    made by halving (in sorted order) the cluster of the largest squared error.

    Only clusters of at least two distinct values are split; there is always one, since
    the caller has more distinct values than centroids.
    """
    ends = bounds.tolist()
    segments = [(a, b) for a, b in itertools.pairwise(ends) if b > a]
    missing = len(ends) - 1 - len(segments)

    def sse(a: int, b: int) -> float:
        if values[a] == values[b - 1]:
            return -1.0  # one value repeated: nothing to split
        total = prefix[b] - prefix[a]
        return float(squares[b] - squares[a] - total * total / (b - a))

    errors = [sse(a, b) for a, b in segments]
    for _ in range(missing):
        worst = max(range(len(segments)), key=errors.__getitem__)
        if errors[worst] < 0:
            break
        a, b = segments[worst]
        # Halve by position, moving the cut off a run of equal values: equal weights
        # always share a cluster.
        pivot = values[(a + b) // 2]
        cut = a + int(np.searchsorted(values[a:b], pivot, side="left"))
        if cut == a:
            cut = a + int(np.searchsorted(values[a:b], pivot, side="right"))
        segments[worst : worst + 1] = [(a, cut), (cut, b)]
        errors[worst : worst + 1] = [sse(a, cut), sse(cut, b)]
    starts, stops = np.array(segments).T
    return (prefix[stops] - prefix[starts]) / (stops - starts)


def _bounds(sorted_values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Start/end positions in ``sorted_values`` of each centroid's cluster, ``[K + 1]``.

    Cluster j holds the values in ``(mid[j-1], mid[j]]``: ``side="right"`` here and
    ``_assign``'s ``side="left"`` draw the same lines.
    """
    inner = np.searchsorted(sorted_values, _midpoints(centroids), side="right")
    return np.concatenate([[0], inner, [len(sorted_values)]])


def _midpoints(centroids: np.ndarray) -> np.ndarray:
    return (centroids[:-1] + centroids[1:]) / 2


@torch.no_grad()
def share_layer(weight: Tensor, *, bits: int, max_iter: int = 50) -> Codebook:
    """Cluster one weight tensor's non-zero values and write the centroids back in place.

    Args:
        weight: a conv/linear weight (any float dtype, any device); changed in place.
        bits: at most ``2**bits`` distinct non-zero values remain.
        max_iter: Lloyd iterations at most.

    Returns:
        The layer's codebook, on the CPU.
    """
    k = 2 ** _check_bits(bits)
    # The clustering runs in numpy on the CPU whatever the weight's device: its sort and
    # binary searches are several times faster than torch's on a CPU, and moving a layer
    # costs milliseconds. float32 holds float16/bfloat16 weights exactly.
    flat = weight.detach().to("cpu", torch.float32).reshape(-1).numpy()
    mask = flat != 0
    live = flat[mask].astype(np.float64)
    if live.size == 0:  # an all-zero layer: nothing to share, nothing to change
        return Codebook(torch.zeros(0), torch.zeros(weight.shape, dtype=torch.uint8),
                        torch.from_numpy(mask).reshape(weight.shape))
    centroids = _lloyd_1d(np.sort(live), k, max_iter)
    # Final assignment to the nearest centroid, then each centroid becomes the mean of its
    # members (Lloyd's last half-step, so they agree even where max_iter cut the
    # iterations short); a cluster left empty is dropped.
    ids = np.searchsorted(_midpoints(centroids), live, side="left")
    counts = np.bincount(ids, minlength=len(centroids))
    sums = np.bincount(ids, weights=live, minlength=len(centroids))
    kept = counts > 0
    renumber = np.cumsum(kept) - 1
    centroids = _no_exact_zero(torch.from_numpy(sums[kept] / counts[kept]).float(),
                               weight.dtype)
    members = renumber[ids].astype(np.uint8)
    indices = np.zeros(flat.size, dtype=np.uint8)
    indices[mask] = members
    # What Codebook.dense computes (float32 centroids, zeros, cast to the weight's dtype),
    # done in numpy because it is several times faster here.
    shared = np.zeros(flat.size, dtype=np.float32)
    shared[mask] = centroids.numpy()[members]
    weight.copy_(torch.from_numpy(shared).reshape(weight.shape))
    return Codebook(centroids, torch.from_numpy(indices).reshape(weight.shape),
                    torch.from_numpy(mask).reshape(weight.shape))


@torch.no_grad()
def kmeans_share(
    model: nn.Module,
    *,
    bits: int,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_iter: int = 50,
) -> dict[str, Codebook]:
    """Share weights by k-means in every chosen conv/linear layer of ``model``, in place.

    Per layer, only the non-zero weights are clustered (``K = min(2**bits, distinct
    non-zero values)``; with no more distinct values than that, they are kept exactly).
    Afterwards each chosen layer has at most ``2**bits`` distinct non-zero values and
    exactly the zeros it had before.

    Args:
        model: changed in place.
        bits: index width, 1 to 8.
        include: layer-name patterns to share (empty: every conv/linear layer).
        exclude: layer-name patterns to leave alone.
        max_iter: Lloyd iterations at most per layer. Linear initialisation and Lloyd's
            iterations are deterministic: no seed.

    Returns:
        The codebooks by layer name (as ``model.named_modules()`` names them), on the
        CPU.

    Raises:
        UserError: ``bits`` outside 1..8, a pattern that matches no layer, patterns that
            leave no layer, or a model without conv/linear layers.
    """
    try:
        _check_bits(bits)
    except ValueError as exc:
        raise UserError(f"k-means weight sharing: {exc}") from None
    if not prunable_layers(model):
        raise UserError(f"{type(model).__name__} has no Conv2d or Linear layer: "
                        "no weights to share by k-means")
    try:
        layers = select_layers(model, include=list(include) or None,
                               exclude=list(exclude) or None)
    except UserError as exc:
        raise UserError(f"k-means weight sharing: {exc}") from None
    return {name: share_layer(layer.weight, bits=bits, max_iter=max_iter)
            for name, layer in layers.items()}


class CodebookHook:
    """A training-loop step hook that fine-tunes shared centroids (Deep Compression §3.3).

    After every optimizer step each weight of a shared layer is replaced by the mean of
    its cluster's updated weights, which becomes the cluster's new centroid; pruned
    weights are set back to exactly zero. If the members all started at centroid ``c``
    and a plain SGD step moved each by ``-lr * g_i``, the mean is
    ``c - lr * mean(g_i)``: Deep Compression's update ``c - lr * sum(g_i)`` with the
    learning rate scaled by ``1 / cluster size``. We chose the mean rather than the sum
    because it needs nothing but the weights after a step: it works unchanged with any
    optimizer of the one training loop (momentum, weight decay, AdamW), with AMP and
    resumed runs, and a big cluster cannot take a step thousands of times the learning
    rate.

    The codebooks' ``centroids`` are updated in place (on their own device), so after
    training they describe the model exactly and can be packed
    (``netshrink.store.packed.pack_model``).
    """

    def __init__(self, codebooks: dict[str, Codebook]) -> None:
        """Keep ``codebooks`` (by layer name, as ``kmeans_share`` returned them) shared."""
        self.codebooks = codebooks
        # Per layer: (mask, member indices, member counts) on the weights' device, made on
        # first use and again only if the model moves to another device.
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def _members(self, name: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        cached = self._cache.get(name)
        if cached is None or cached[0].device != device:
            book = self.codebooks[name]
            mask = book.mask.to(device)
            ids = book.indices.to(device)[mask].long()
            counts = torch.bincount(ids, minlength=len(book.centroids)).clamp(min=1)
            cached = self._cache[name] = (mask, ids, counts)
        return cached

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        """Re-share the weights of ``model`` after an optimizer step (in place)."""
        modules = dict(model.named_modules())
        for name, book in self.codebooks.items():
            weight = modules[name].weight
            if len(book.centroids) == 0:
                weight.zero_()  # an all-zero layer stays all zero
                continue
            mask, ids, counts = self._members(name, weight.device)
            # Boolean indexing reads in logical order whatever the memory format
            # (channels_last included), the same order ``ids`` was taken in.
            sums = torch.zeros(len(counts), dtype=torch.float64, device=weight.device)
            sums.index_add_(0, ids, weight[mask].double())
            centroids = _no_exact_zero((sums / counts).float(), weight.dtype)
            book.centroids = centroids.to(book.centroids.device)
            values = torch.zeros_like(weight, dtype=torch.float32)
            values[mask] = centroids[ids]
            weight.copy_(values)
