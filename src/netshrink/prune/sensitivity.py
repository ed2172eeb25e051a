"""Which layers can lose weights and which cannot: a per-layer (or per-group) sensitivity scan.

Each prunable unit is pruned *alone* at one ratio, on a copy of the model, and top-1 is
measured on a validation subset; the drop against the unpruned model says how much that
unit matters. Two kinds of unit:

* ``magnitude``: one conv/linear layer, its smallest ``ratio`` of weights zeroed
  (unstructured L1 magnitude, exactly ``round(ratio * n)`` weights).
* ``channel``: one *coupled group* of channels as the channel-group engine
  (``prune.groups``, on Torch-Pruning's dependency graph) finds it. Across a residual
  add, a block's last conv, the shortcut (downsample) conv, their BNs and the next
  blocks' input convs all share one channel index; scanning the convs one by one would
  report the block's last conv as free to prune when it is not (its channels cannot go
  without the shortcut's). So a group is pruned as a whole: the ``ratio`` of its
  channels whose filters have the lowest L1 norms (``filter_l1``) leave every member
  at once.

The caller's model is never changed: every scan works on deep copies.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from netshrink.bench.accuracy import evaluate
from netshrink.data.base import Split
from netshrink.errors import UserError
from netshrink.models.counting import count_macs
from netshrink.models.select import prunable_layers, select_layers
from netshrink.prune.groups import (
    ChannelGraph,
    ChannelGroup,
    kept_channels,
    output_layer,
    output_shape,
)
from netshrink.prune.magnitude import magnitude_masks
from netshrink.train.masks import apply_masks

__all__ = [
    "BASELINE",
    "METHODS",
    "Method",
    "channel_groups",
    "check_method",
    "check_ratio",
    "check_split",
    "example_input_from",
    "layer_param_table",
    "prune_channel_groups",
    "sensitivity_scan",
]

Method = Literal["magnitude", "channel"]
METHODS: tuple[str, ...] = ("magnitude", "channel")
BASELINE = "(unpruned)"  # the ``layer`` of a scan's baseline row


# --------------------------------------------------------------------------- checks


def check_ratio(ratio: float, what: str = "ratio") -> None:
    """Raise ``UserError`` unless ``ratio`` is in [0, 1).

    Raises:
        UserError: ``ratio`` is below 0, 1 or more, or not a number.
    """
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 <= ratio < 1:
        raise UserError(f"{what} must be in [0, 1) (a fraction pruned), not {ratio!r}")


def check_method(method: str) -> None:
    """Raise ``UserError`` unless ``method`` is ``magnitude`` or ``channel``.

    Raises:
        UserError: an unknown method.
    """
    if method not in METHODS:
        raise UserError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")


def check_split(split: Split | None, name: str = "val") -> Split:
    """The split itself, if it has images.

    Raises:
        UserError: the split is missing or empty.
    """
    if split is None or len(split) == 0:
        hint = (" (set data.val_size above 0 or use split: test in a recipe; give val= in "
                "Python)" if name == "val" else "")
        raise UserError(f"split {name!r} has no images to measure accuracy on{hint}")
    return split


# --------------------------------------------------------------------------- tables


def layer_param_table(model: nn.Module) -> list[dict[str, Any]]:
    """Parameters per layer: every module that holds parameters of its own, in model order.

    Args:
        model: any module.

    Returns:
        Rows ``{"name", "type", "shape", "params", "share"}`` (``shape`` of the weight, or
        of the first parameter; ``share`` of all the model's parameters), then a total row
        named ``(total)``.
    """
    total = sum(p.numel() for p in model.parameters())
    rows: list[dict[str, Any]] = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        first = own.get("weight", next(iter(own.values())))
        n = sum(p.numel() for p in own.values())
        rows.append({"name": name or "(model)", "type": type(module).__name__,
                     "shape": list(first.shape), "params": n, "share": n / max(1, total)})
    rows.append({"name": "(total)", "type": "", "shape": [], "params": total, "share": 1.0})
    return rows


def example_input_from(split: Split, device: str | torch.device = "cpu") -> Tensor:
    """One image of ``split`` as a batch of one: what the dependency graph is traced with.

    Raises:
        UserError: the split is empty.
    """
    for x, _ in split.batches(1, shuffle=False, augment=False):
        return x.to(device)
    raise UserError("the split has no images to trace the model with")


# --------------------------------------------------------------------------- channel groups


def _groups(
    graph: ChannelGraph, *, include: list[str] | None, exclude: list[str] | None
) -> list[ChannelGroup]:
    """The groups of ``graph``'s model that a scan offers, in model order."""
    work = graph.model
    chosen = set(select_layers(work, include=include, exclude=exclude))  # checks patterns
    modules = dict(work.named_modules())
    classifier = output_layer(work)
    excluded = set(prunable_layers(work)) - set(select_layers(work, exclude=exclude))
    # The classifier (its outputs are the classes) and excluded layers are ignored: a
    # group that would remove their output channels is not offered at all. They may still
    # lose *input* channels, when the layer feeding them is pruned.
    ignored = [modules[classifier]] + [modules[n] for n in sorted(excluded)]
    found = [g for g in graph.groups(ignored) if g.outputs
             and (include is None or any(n in chosen for n in g.outputs))]
    found.sort(key=lambda g: g.order)
    if not found:
        raise UserError(f"include={include} exclude={exclude} leave no channel group to prune "
                        f"(the classifier {classifier!r} is never pruned on its outputs)")
    return found


def channel_groups(
    model: nn.Module,
    example_input: Tensor,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> list[ChannelGroup]:
    """The coupled channel groups of ``model``, in model order.

    Args:
        model: the model (not changed: a copy is traced).
        example_input: a batch the model accepts, on the model's device.
        include: a group is offered if one of its output layers matches (all by default).
        exclude: a group is dropped if one of its output layers matches; the classifier
            (the last conv/linear layer) is always excluded.

    Returns:
        One ``ChannelGroup`` per group (without Torch-Pruning's group: the traced copy is
        let go); every conv/linear layer but the classifier is an output layer of exactly
        one group (unless excluded).

    Raises:
        UserError: a pattern matches no layer, or nothing is left to prune.
    """
    graph = ChannelGraph(copy.deepcopy(model).eval(), example_input)
    return [dataclasses.replace(g, group=None)
            for g in _groups(graph, include=include, exclude=exclude)]


def _removed(channels: int, ratio: float) -> int:
    """Channels a group of ``channels`` loses at ``ratio``; at least one always stays.

    The same rule as Torch-Pruning's ``MetaPruner`` (and ``prune.channel``): the group
    keeps ``floor(channels * (1 - ratio))`` channels, never fewer than one.
    """
    return channels - max(1, kept_channels(channels, ratio))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_channel_groups(
    model: nn.Module,
    ratio: float,
    example_input: Tensor,
    *,
    only: Iterable[str] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> nn.Module:
    """A copy of ``model`` with the lowest-L1 ``ratio`` of each group's channels removed.

    Every group keeps ``floor(channels * (1 - ratio))`` channels (at least one). Channels
    are scored (``filter_l1``: the L1 norms of the filters producing them) on the unpruned
    model, so the order groups are pruned in does not matter.

    Args:
        model: the model (not changed).
        ratio: fraction of each group's channels to remove, in [0, 1).
        example_input: a batch the model accepts, on its device.
        only: prune only the groups with these names (``ChannelGroup.name``); all if None.
        include / exclude: as for ``channel_groups``.

    Returns:
        The pruned copy, in eval mode.

    Raises:
        UserError: a bad ratio or pattern, an unknown group name, or the pruned model's
            output shape changed (the classifier was not recognised).
    """
    check_ratio(ratio)
    work = copy.deepcopy(model).eval()
    graph = ChannelGraph(work, example_input)
    groups = _groups(graph, include=include, exclude=exclude)
    if only is not None:
        wanted = set(only)
        unknown = wanted - {g.name for g in groups}
        if unknown:
            raise UserError(f"no channel group named {sorted(unknown)}")
        groups = [g for g in groups if g.name in wanted]
    scores = graph.scores(groups, "filter_l1")
    with torch.no_grad():
        before = work(example_input).shape
    for group, channel_scores in zip(groups, scores, strict=True):
        k = _removed(group.channels, ratio)
        if k > 0:
            assert channel_scores is not None  # filter_l1 ranks every group
            graph.prune_to(group, channel_scores, group.channels - k)
    after = output_shape(work, example_input)
    if after != tuple(before):
        raise UserError(f"channel pruning changed the model's output from {list(before)} to "
                        f"{list(after)}: exclude the layer that produces the logits")
    return work.eval()


# --------------------------------------------------------------------------- the scan


def sensitivity_scan(
    model: nn.Module,
    data_split: Split,
    *,
    method: Method = "magnitude",
    ratio: float = 0.9,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    example_input: Tensor | None = None,
    max_images: int | None = 2000,
    device: str = "cpu",
    batch_size: int = 256,
    split_name: str = "val",
) -> list[dict[str, Any]]:
    """Prune each layer (``magnitude``) or coupled group (``channel``) alone; measure top-1.

    Args:
        model: the trained model (not changed: the scan works on copies).
        data_split: where accuracy is measured (a validation split, not the test set).
        method: ``magnitude`` (one layer's smallest weights) or ``channel`` (one group's
            lowest-L1 channels, removed from every coupled layer).
        ratio: fraction pruned from the layer (of weights) or the group (of channels).
        include / exclude: layer-name patterns; for ``channel`` they apply to a group's
            output layers.
        example_input: a batch to trace the model with (``channel``); by default the
            first image of ``data_split``.
        max_images: evaluate on the first this many images (None: all).
        device: where to run.
        batch_size: evaluation batch size.
        split_name: the split's name, for messages.

    Returns:
        A baseline row (``layer`` = ``(unpruned)``, ``drop`` 0) and then one row per layer
        or group in model order: ``{"layer", "params", "top1", "drop", "removed",
        "ratio", "kind"}``; ``drop`` is baseline top-1 minus this top-1 (a fraction; it
        can be slightly negative: pruning may help on a small subset by chance). Group rows
        add ``outputs``, ``inputs``, ``channels``, ``pruned_channels`` and
        ``macs_removed`` (multiply-accumulates of one image the pruning removed);
        ``params`` is the layer's weights or the parameters the group's channels hold,
        ``removed`` how many were zeroed (magnitude) or removed (channel).

    Raises:
        UserError: unknown method, ratio outside [0, 1), a bad pattern, an empty split.
    """
    check_method(method)
    check_ratio(ratio)
    check_split(data_split, split_name)
    work = copy.deepcopy(model).to(device).eval()

    def top1(m: nn.Module) -> float:
        return evaluate(m, data_split, batch_size=batch_size, device=device,
                        max_images=max_images, split_name=split_name).top1

    base = top1(work)
    layers = prunable_layers(work)
    rows: list[dict[str, Any]] = [{
        "layer": BASELINE, "kind": "baseline", "ratio": 0.0,
        "params": sum(layer.weight.numel() for layer in layers.values()),
        "removed": 0, "top1": base, "drop": 0.0,
    }]
    if method == "magnitude":
        for name, layer in select_layers(work, include=include, exclude=exclude).items():
            saved = layer.weight.detach().clone()
            masks = magnitude_masks({name: layer}, ratio, "layer")
            apply_masks(work, masks)
            acc = top1(work)
            with torch.no_grad():
                layer.weight.copy_(saved)  # one working copy, restored layer by layer
            rows.append({"layer": name, "kind": "layer", "ratio": ratio,
                         "params": saved.numel(), "removed": int((~masks[name]).sum()),
                         "top1": acc, "drop": base - acc})
        return rows

    if example_input is None:
        example_input = example_input_from(data_split, device)
    example_input = example_input.to(device)
    total = _count(work)
    shape = list(example_input.shape[1:])
    macs = count_macs(work, shape)
    for info in channel_groups(work, example_input, include=include, exclude=exclude):
        pruned = prune_channel_groups(work, ratio, example_input, only=[info.name],
                                      include=include, exclude=exclude)
        acc = top1(pruned)
        rows.append({"layer": info.name, "kind": "group", "ratio": ratio,
                     "params": info.params, "removed": total - _count(pruned),
                     "macs_removed": macs - count_macs(pruned, shape),
                     "top1": acc, "drop": base - acc, "root": info.root,
                     "outputs": info.outputs, "inputs": info.inputs,
                     "channels": info.channels,
                     "pruned_channels": _removed(info.channels, ratio)})
    return rows
