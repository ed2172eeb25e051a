"""Structured channel pruning: remove whole conv filters and everything coupled to them.

Unstructured pruning leaves a dense model full of zeros; this one makes a genuinely
smaller dense model, with fewer parameters and multiply-accumulates on any hardware.

The channel-group engine (``prune.groups``) traces the model with Torch-Pruning's
dependency graph and finds the *groups* of coupled channels: a conv's filters, its batch
norm, the next conv's input channels, and, across a residual add, every conv, BN and
shortcut that writes into the same tensor (in a ResNet stage: each block's last conv, the
downsample conv and their BNs). Removing channel i of a group removes it from all of
them, so the model stays well-formed. Torch-Pruning's criteria score each group's
channels (the group's L1 or L2 norms, BN scales, or first-order Taylor scores, each
averaged over the group's layers and divided by the group's mean so that groups compare
in global ranking); this module decides how many channels each group loses, and the
engine removes the lowest-scored.

How many (the rules of Torch-Pruning's ``MetaPruner``, plus a cap it lacks):
  * ``layer`` scope: a group of ``c`` channels keeps ``floor(c * (1 - ratio))``.
  * ``global`` scope: all groups' channels are ranked together and the lowest-scored go
    until ``floor(C * (1 - ratio))`` of all ``C`` channels remain; no group loses more
    than ``max_layer_ratio`` of its channels (global ranking can otherwise empty a
    layer), and whatever a capped group cannot give is taken from the next-lowest.
  * ``steps`` > 1: step ``s`` prunes to ``ratio * s / steps``, measured against the
    channel counts *before the first step*, so iterative pruning ends at the same
    per-layer counts as one-shot (layer scope) or the same total (global scope).
  * ``round_to``: each kept count is rounded to a multiple, for a grouped conv's
    channels the count in each conv group (never below one multiple, never above the
    channels there are): ``auto`` (the default) to the nearest multiple of 16 (8 for
    a layer narrower than 64: ``AUTO_ROUND_TO``), a number down to a multiple of it,
    None (or 1) not at all.
Every group keeps at least one channel (one per conv group).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from torch import Tensor, nn

from netshrink.errors import UserError
from netshrink.limits import clip
from netshrink.prune.groups import (
    FLOAT_SLACK,
    ChannelGraph,
    check_importance,
    kept_channels,
    output_layer,
    output_shape,
)
from netshrink.prune.resume import StepCheckpoints

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

if TYPE_CHECKING:
    from netshrink.data import DataBundle

__all__ = ["AUTO_ROUND_TO", "AUTO_ROUND_TO_NARROW", "ChannelPruneConfig", "channel_report",
           "prune_channels", "rounded_keep"]

# What ``round_to: auto`` rounds kept channel counts to (per conv group). ONNX Runtime's
# CPU convolutions (MLAS's NCHWc kernels, blocks of 16 channels with AVX-512, 8 with
# AVX2) run a conv in blocked layout only when its channel counts are multiples of the
# block; a count that is not falls back to slower kernels with layout reorders around
# it, so a model pruned to arbitrary widths can be slower than the original. Layers of
# ``AUTO_WIDE`` channels or more go to multiples of 16 (multiples of 8 too: right for
# AVX2 and for fp16 tensor cores), where most of the time is spent; narrower ones to
# multiples of 8, so that small models still prune finely enough (a 32-wide layer at
# 0.3 keeps 24, not 16). Measured at ratio 0.3 (torchvision's models, batch 1, ONNX
# Runtime, 1 thread, Xeon with AVX-512; benchmarks/results/zoo.md): unrounded,
# MobileNetV2 ran 0.79x, MobileNetV3-small 0.44x, EfficientNet-B0 0.65x and RegNetX
# 0.94x the original's speed; with this rounding 1.64x, 1.41x, 1.61x, 1.38x, and every
# other family 1.34-1.94x. Every layer to 16 was faster than every layer to 8 on most
# models at equal size (MobileNetV2 1.85x against 1.54x).
AUTO_ROUND_TO = 16
AUTO_ROUND_TO_NARROW = 8
AUTO_WIDE = 64

TrainFn = Callable[[nn.Module], object]


class ChannelPruneConfig(BaseModel):
    """The ``prune.channel`` stage.

    Attributes:
        ratio: fraction of channels removed, in [0, 1): of each group of coupled
            channels (``layer`` scope) or of all of them (``global``); Torch-Pruning's
            ``pruning_ratio``.
        importance: how channels are scored: ``l1`` / ``l2`` filter norms, ``bn_scale``
            (the BN's gamma, "network slimming") or ``taylor`` (|weight x gradient|,
            gradients from a few calibration batches).
        scope: ``layer`` (every group loses ``ratio``), ``global`` (the lowest scores
            anywhere go, so redundant layers lose more) or ``sensitivity`` (per-group
            ratios from a channel sensitivity scan on the validation split).
        steps: 1 for one-shot; N > 1 prunes in N equal steps.
        finetune_epochs: fine-tuning between iterative steps (not after the last one: a
            recipe adds a ``finetune`` stage for that).
        finetune_lr: that fine-tuning's learning rate.
        include: patterns (``fnmatch``) of the conv/linear layers whose output channels
            may go (empty: all of them); the others are left whole.
        exclude: patterns of module names whose *output* channels must stay, with
            everything coupled to them; submodules of a matched module are kept too. By
            default (None) the output layer, the last conv/linear layer in model order
            (``fc``, ``head``, ``classifier.1``...), whose outputs are the classes; an
            empty list protects nothing. (``ignore``, its older name, is accepted.)
            Every layer selection in netshrink is these two keys.
        round_to: keep channel counts multiples of this, rounded down (for a grouped
            conv, the channels of each conv group); ``auto`` (the default): the nearest
            multiple of 16, or of 8 for a layer narrower than 64, what CPU runtimes'
            kernels need (``AUTO_ROUND_TO``); None or 1: the counts the ratio gives.
        max_layer_ratio: in ``global`` and ``sensitivity`` scope, the most any group
            may lose.
        scan_ratio: ``sensitivity`` scope: each group alone loses this fraction of its
            channels, measured on ``scan_images`` validation images; the ratios then
            follow ``prune.allocation`` (robust and large groups lose more, as many
            parameters in all as ``ratio`` removes uniformly).
        scan_images: ``sensitivity`` scope: the validation images of that scan.
        share_by: ``sensitivity`` scope: what ``ratio`` is shared out as, ``params``
            (as many parameters as the uniform ratio removes: size) or ``macs`` (as
            much compute: latency).
    """

    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(ge=0, lt=1)
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l1"
    scope: Literal["layer", "global", "sensitivity"] = "layer"
    steps: int = Field(default=1, ge=1)
    finetune_epochs: int = Field(default=0, ge=0)
    finetune_lr: float = Field(default=0.01, gt=0)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] | None = Field(
        default=None, validation_alias=AliasChoices("exclude", "ignore"))
    round_to: Annotated[int, Field(ge=1)] | Literal["auto"] | None = "auto"
    max_layer_ratio: float = Field(default=0.95, gt=0, lt=1)
    scan_ratio: float = Field(default=0.5, gt=0, lt=1)
    scan_images: int = Field(default=1000, gt=0)
    share_by: Literal["params", "macs"] = "params"


def prune_channels(
    model: nn.Module,
    cfg: ChannelPruneConfig,
    *,
    example_input: Tensor,
    data: DataBundle | None = None,
    device: str = "cpu",
    train_fn: TrainFn | None = None,
    steps: StepCheckpoints | None = None,
    log: Callable[[str], None] = LOG.info,
) -> nn.Module:
    """Remove channels from a copy of ``model``; the caller's model is not changed.

    Args:
        model: the model to prune (any ``nn.Module`` of convs, BNs, linears and the
            usual glue: adds, concatenations, pooling, flatten).
        cfg: how much and how (see ``ChannelPruneConfig``).
        example_input: one batch the model accepts, e.g. ``torch.zeros(1, 3, 32, 32)``;
            traced once per step to find the coupled channels.
        data: the splits; ``taylor`` importance takes gradients on ``data.calib``.
        device: where to prune (and to compute Taylor gradients).
        train_fn: called with the model between iterative steps (not after the last);
            trains it in place.
        steps: where finished steps are kept (with a pruned spec): the pruning resumes
            after the last one kept.
        log: where the line saying so goes.

    Returns:
        The pruned copy, in eval mode, on ``device``.

    Raises:
        UserError: an ``include``/``exclude`` pattern matches no module; nothing to prune (no conv,
            or every conv's output is ignored); ``taylor`` without data; grouped convs;
            pruning that would change the model's output shape (the layer producing it
            is not the last conv/linear, nor in ``exclude``).
    """
    check_importance(cfg.importance, data)
    pruned = copy.deepcopy(model).to(device).eval()
    example = example_input.to(device)
    initial: dict[str, int] = {}  # group root's name -> its channels before step 1
    first = 1
    found = steps.latest() if steps is not None else None
    if found is not None:  # the model after a finished step, and the counts it started from
        done, saved, extra = found
        pruned, first = saved.to(device).eval(), done + 1
        initial = {str(k): int(v) for k, v in extra.get("initial", {}).items()}
        log(f"resuming after pruning step {done} of {cfg.steps}")
    ignored = _ignored_modules(pruned, cfg.exclude, cfg.include)
    out_shape = _input_shape_ok(model, example, device)
    allocated = (_sensitivity_ratios(model, cfg, example, data, device, log)
                 if cfg.scope == "sensitivity" else None)
    for step in range(first, cfg.steps + 1):
        ratio = cfg.ratio * step / cfg.steps
        kept_whole = _prune_step(pruned, cfg, ratio, example, ignored, initial, data, device,
                                 allocated and {g: r * step / cfg.steps
                                                for g, r in allocated.items()})
        if kept_whole and step == first:
            shown = ", ".join(kept_whole[:3]) + (", ..." if len(kept_whole) > 3 else "")
            log(f"{len(kept_whole)} channel groups kept whole (their channels pass through "
                f"a channel shuffle or another reshape that mixes them): {shown}")
        now = output_shape(pruned, example)
        if now != out_shape:
            raise UserError(_changed_output(out_shape, now, cfg.exclude, model))
        if step < cfg.steps and train_fn is not None:
            if steps is not None:
                steps.current = step
            train_fn(pruned)
            pruned.to(device).eval()
            if steps is not None:
                steps.save(pruned, {"initial": initial})
    return pruned.eval()


def _input_shape_ok(model: nn.Module, example: Tensor, device: str) -> tuple[int, ...]:
    """The unpruned model's output shape on ``example``.

    Raises:
        UserError: the model does not run on it, or returns no single tensor.
    """
    try:
        with torch.no_grad():
            out = copy.deepcopy(model).to(device).eval()(example)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(
            f"{type(model).__name__} does not run on example_input of shape "
            f"{list(example.shape)} ({type(exc).__name__}: {clip(str(exc), 160)}); give one "
            "batch the model takes") from None
    if not isinstance(out, Tensor):
        raise UserError(f"{type(model).__name__} returns a {type(out).__name__}, not one "
                        "tensor of logits: channel pruning takes a model whose forward "
                        "returns them (wrap it in a module that picks them)")
    return tuple(out.shape)


def _changed_output(before: tuple, after: tuple, exclude: list[str] | None,
                    model: nn.Module) -> str:
    changed = f"channel pruning changed the model's output from {list(before)} to {list(after)}"
    if exclude is None:
        return (f"{changed}: the output layer was taken to be {output_layer(model)!r} (the "
                "last conv/linear layer); name the layer that produces the output in exclude")
    return (f"{changed}: add the layer that produces the output (the classifier, e.g. "
            f"'fc') to exclude (or ignore, its older name; now {exclude})")


def channel_report(before: nn.Module, after: nn.Module) -> list[dict[str, object]]:
    """Per conv/linear layer: channels and parameters before and after pruning.

    Args:
        before: the model before pruning.
        after: the pruned model (the same module names).

    Returns:
        One dict per conv/linear layer of ``before``, in module order, with ``name``,
        ``type`` (``conv`` or ``linear``), ``in_before``/``in_after``,
        ``out_before``/``out_after`` (channels or features) and
        ``params_before``/``params_after`` (weight and bias elements).
    """
    after_modules = dict(after.named_modules())
    rows: list[dict[str, object]] = []
    for name, old in before.named_modules():
        new = after_modules.get(name)
        if not isinstance(old, nn.Conv2d | nn.Linear) or not isinstance(new, type(old)):
            continue
        rows.append({
            "name": name,
            "type": "conv" if isinstance(old, nn.Conv2d) else "linear",
            "in_before": _width(old, out=False),
            "in_after": _width(new, out=False),
            "out_before": _width(old, out=True),
            "out_after": _width(new, out=True),
            "params_before": sum(p.numel() for p in old.parameters(recurse=False)),
            "params_after": sum(p.numel() for p in new.parameters(recurse=False)),
        })
    return rows


def _width(layer: nn.Module, *, out: bool) -> int:
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels if out else layer.in_channels
    assert isinstance(layer, nn.Linear)
    return layer.out_features if out else layer.in_features


def _matching(named: dict[str, nn.Module], pattern: str, key: str) -> list[str]:
    """Module names ``pattern`` matches.

    Raises:
        UserError: it matches none (the message shows real names).
    """
    names = [n for n in named if n]
    matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        layers = [n for n in names if isinstance(named[n], nn.Conv2d | nn.Linear)]
        examples = layers[:3] + (["..."] if len(layers) > 5 else []) + layers[3:][-2:]
        raise UserError(
            f"{key} pattern {pattern!r} matches no module; module names look like: "
            f"{', '.join(examples) or 'none'} (patterns use fnmatch: 'layer4.*')")
    return matched


def _ignored_modules(model: nn.Module, exclude: list[str] | None,
                     include: list[str] = ()) -> list[nn.Module]:  # type: ignore[assignment]
    """The modules whose output channels stay: those ``exclude`` matches and all their
    submodules (for None, the output layer: ``output_layer``, the last conv/linear), and
    with ``include``, every conv/linear layer it does not match.

    Raises:
        UserError: a pattern matches no module.
    """
    named = dict(model.named_modules())
    ignored: dict[int, nn.Module] = {}
    chosen = [output_layer(model)] if exclude is None else [
        n for pattern in exclude for n in _matching(named, pattern, "exclude")]
    if include:
        kept = {n for pattern in include for n in _matching(named, pattern, "include")}
        chosen += [n for n, m in named.items()
                   if isinstance(m, nn.Conv2d | nn.Linear) and n not in kept]
    for n in chosen:
        for m in named[n].modules():
            ignored[id(m)] = m
    return list(ignored.values())


def _prune_step(
    model: nn.Module,
    cfg: ChannelPruneConfig,
    ratio: float,
    example: Tensor,
    ignored: list[nn.Module],
    initial: dict[str, int],
    data: DataBundle | None,
    device: str,
    allocated: dict[str, float] | None = None,
) -> list[str]:
    """Prune ``model`` in place to ``ratio`` of the ``initial`` channel counts (each group
    to its ``allocated`` ratio, by group name, where given); returns the groups kept
    whole (``ChannelGraph.kept_whole``)."""
    # Traced afresh each step: cheap, and nothing stale survives fine-tuning in between.
    graph = ChannelGraph(model, example)
    groups = graph.groups(ignored)
    if not any(group.convs for group in groups):
        shown = cfg.exclude if cfg.exclude is not None else [output_layer(model)]
        raise UserError(
            "nothing to channel-prune: the model has no conv layer whose output channels "
            f"may change (no Conv2d, or exclude {shown} covers them all)"
        )
    scores = graph.scores(groups, cfg.importance, data=data, device=device)
    # A group the criterion cannot rank (bn_scale without a BN) keeps its channels.
    ranked = [(g, s) for g, s in zip(groups, scores, strict=True) if s is not None]
    if not ranked:
        raise UserError(f"importance {cfg.importance!r} cannot rank any channel of "
                        f"{type(model).__name__} (bn_scale needs a BatchNorm after the "
                        "pruned convs); use l1, l2 or taylor")
    currents = [group.channels for group, _ in ranked]
    starts = [initial.setdefault(group.root, group.channels) for group, _ in ranked]
    if allocated is not None:
        keeps = [kept_channels(start, allocated.get(group.name, ratio))
                 for (group, _), start in zip(ranked, starts, strict=True)]
    elif cfg.scope == "layer":
        keeps = [kept_channels(start, ratio) for start in starts]
    else:
        keeps = _global_keeps(currents, starts, [s for _, s in ranked], ratio,
                              cfg.max_layer_ratio)
    for (group, channel_scores), current, keep in zip(ranked, currents, keeps, strict=True):
        keep = rounded_keep(max(1, keep), current, group.blocks, cfg.round_to)
        if keep < current:  # the lowest scores go (ties by position)
            graph.prune_to(group, channel_scores, keep)
    return graph.kept_whole


def _sensitivity_ratios(model: nn.Module, cfg: ChannelPruneConfig, example: Tensor,
                        data: DataBundle | None, device: str,
                        log: Callable[[str], None]) -> dict[str, float]:
    """Per-group ratios from a channel scan of the unpruned ``model`` (``scope:
    sensitivity``).

    Raises:
        UserError: no validation split to scan on.
    """
    from netshrink.prune.allocation import allocate_channel_ratios
    from netshrink.prune.sensitivity import sensitivity_scan

    if data is None or data.val is None or len(data.val) == 0:
        raise UserError("prune.channel scope: sensitivity scans on the validation split; "
                        "set data.val_size > 0 in a recipe, give val= in Python (or use "
                        "scope: layer)")
    log(f"channel sensitivity scan: each group alone at {cfg.scan_ratio:g}, "
        f"{min(cfg.scan_images, len(data.val))} validation images")
    rows = sensitivity_scan(model, data.val, method="channel", ratio=cfg.scan_ratio,
                            include=cfg.include or None,
                            exclude=cfg.exclude, example_input=example[:1],
                            max_images=cfg.scan_images, device=device)
    ratios = allocate_channel_ratios(rows, cfg.ratio, max_ratio=cfg.max_layer_ratio,
                                     cost=cfg.share_by)
    log("channel ratios by sensitivity: " + ", ".join(
        f"{name.split('+')[0]} {r:.2f}" for name, r in ratios.items()))
    return ratios


def _global_keeps(
    currents: list[int], starts: list[int], scores: list[Tensor], ratio: float,
    max_layer: float,
) -> list[int]:
    """Channels each group keeps when all groups' channels are ranked together."""
    to_remove = sum(currents) - kept_channels(sum(starts), ratio)
    # No group may fall below this many (a capped group's share goes to the next-lowest).
    floors = [max(1, math.ceil(start * (1 - max_layer) - FLOAT_SLACK)) for start in starts]
    room = [max(0, c - f) for c, f in zip(currents, floors, strict=True)]
    owners = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    order = torch.argsort(torch.cat(scores), stable=True)
    removed = [0] * len(currents)
    for owner in owners[order].tolist():
        if to_remove <= 0:
            break
        if removed[owner] < room[owner]:
            removed[owner] += 1
            to_remove -= 1
    return [c - r for c, r in zip(currents, removed, strict=True)]


def rounded_keep(keep: int, current: int, blocks: int, round_to: int | str | None) -> int:
    """The channels a group of ``current`` keeps when ``keep`` are asked for: per conv
    group (``blocks`` of them, 1 for none) a multiple of the rounding, at least one
    multiple (or one channel) per group, never more than there are.

    ``round_to``: ``"auto"`` rounds to the nearest multiple of ``AUTO_ROUND_TO`` (of
    ``AUTO_ROUND_TO_NARROW`` where a conv group is narrower than ``AUTO_WIDE``, not at
    all below twice that), a number rounds down to a multiple of it, None or 1 does not
    round.
    """
    blocks = max(1, blocks)
    width = current // blocks
    if round_to == "auto":
        step = AUTO_ROUND_TO if width >= AUTO_WIDE else AUTO_ROUND_TO_NARROW
        if width < 2 * AUTO_ROUND_TO_NARROW:  # a tiny layer: rounding would keep it whole
            step = 1
    else:
        step = int(round_to or 1)
    wanted = keep / blocks
    if step <= 1:
        per = math.floor(wanted + FLOAT_SLACK)
    elif round_to == "auto":
        per = step * math.floor(wanted / step + 0.5)
    else:
        per = step * math.floor(wanted / step + FLOAT_SLACK)
    return min(width, max(step, per, 1)) * blocks
