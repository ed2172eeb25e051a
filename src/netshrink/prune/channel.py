"""Structured channel pruning: remove whole conv filters and everything coupled to them.

Unstructured pruning leaves a dense model full of zeros; this one makes a genuinely
smaller dense model, with fewer parameters and multiply-accumulates on any hardware.

Torch-Pruning's dependency graph, traced from one forward pass, finds the *groups* of
coupled channels: a conv's filters, its batch norm, the next conv's input channels, and,
across a residual add, every conv, BN and shortcut that writes into the same tensor (in a
ResNet stage: each block's last conv, the downsample conv and their BNs). Removing
channel i of a group removes it from all of them, so the model stays well-formed.
Torch-Pruning's criteria score each group's channels (the group's L1 or L2 filter norms,
BN scales, or first-order Taylor scores, each averaged over the group's layers and
divided by the group's mean so that groups compare in global ranking); this module
decides how many channels each group loses, and Torch-Pruning does the surgery.

How many (the rules of Torch-Pruning's ``MetaPruner``, plus a cap it lacks):
  * ``layer`` scope: a group of ``c`` channels keeps ``floor(c * (1 - ratio))``.
  * ``global`` scope: all groups' channels are ranked together and the lowest-scored go
    until ``floor(C * (1 - ratio))`` of all ``C`` channels remain; no group loses more
    than ``max_layer_ratio`` of its channels (global ranking can otherwise empty a
    layer), and whatever a capped group cannot give is taken from the next-lowest.
  * ``steps`` > 1: step ``s`` prunes to ``ratio * s / steps``, measured against the
    channel counts *before the first step*, so iterative pruning ends at the same
    per-layer counts as one-shot (layer scope) or the same total (global scope).
  * ``round_to``: each kept count is rounded down to a multiple (never below one
    multiple, never above the channels there are).
Every group keeps at least one channel.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from netshrink.errors import UserError
from netshrink.prune.resume import StepCheckpoints

if TYPE_CHECKING:
    from netshrink.data import DataBundle

__all__ = ["ChannelPruneConfig", "channel_report", "prune_channels"]

TrainFn = Callable[[nn.Module], object]

# Taylor importance: gradients summed over this many calibration batches of this size.
# Enough for a stable ranking, small enough to take seconds on a CPU.
TAYLOR_BATCHES = 4
TAYLOR_BATCH_SIZE = 64

# Slack for float error in ``c * (1 - ratio)``: 10 * (1 - 0.3) is 6.999..., not 7.
_EPS = 1e-9


class ChannelPruneConfig(BaseModel):
    """The ``prune.channel`` stage.

    Args:
        ratio: fraction of channels removed, in [0, 1): of each group of coupled
            channels (``layer`` scope) or of all of them (``global``); Torch-Pruning's
            ``pruning_ratio``.
        importance: how channels are scored: ``l1`` / ``l2`` filter norms, ``bn_scale``
            (the BN's gamma, "network slimming") or ``taylor`` (|weight x gradient|,
            gradients from a few calibration batches).
        scope: ``layer`` (every group loses ``ratio``) or ``global`` (the lowest scores
            anywhere go, so redundant layers lose more).
        steps: 1 for one-shot; N > 1 prunes in N equal steps.
        finetune_epochs / finetune_lr: fine-tuning between iterative steps (not after the
            last one: a recipe adds a ``finetune`` stage for that).
        ignore: patterns (``fnmatch``) of module names whose *output* channels must stay,
            with everything coupled to them; the classifier by default, whose outputs
            are the classes. Submodules of a matched module are kept too.
        round_to: keep channel counts multiples of this (8 suits tensor cores).
        max_layer_ratio: in ``global`` scope, the most any group may lose.
    """

    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(ge=0, lt=1)
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l1"
    scope: Literal["layer", "global"] = "layer"
    steps: int = Field(default=1, ge=1)
    finetune_epochs: int = Field(default=0, ge=0)
    finetune_lr: float = Field(default=0.01, gt=0)
    ignore: list[str] = Field(default_factory=lambda: ["fc"])
    round_to: int | None = Field(default=None, ge=1)
    max_layer_ratio: float = Field(default=0.95, gt=0, lt=1)


def prune_channels(
    model: nn.Module,
    cfg: ChannelPruneConfig,
    *,
    example_input: Tensor,
    data: DataBundle | None = None,
    device: str = "cpu",
    train_fn: TrainFn | None = None,
    steps: StepCheckpoints | None = None,
    log: Callable[[str], None] = print,
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
        UserError: an ``ignore`` pattern matches no module; nothing to prune (no conv,
            or every conv's output is ignored); ``taylor`` without data; grouped convs;
            pruning that would change the model's output shape (its classifier is not
            in ``ignore``).
    """
    if cfg.importance == "taylor" and data is None:
        raise UserError("importance 'taylor' needs data for its gradients; "
                        "use 'l1', 'l2' or 'bn_scale', or pass the data")
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
    _refuse_grouped_convs(pruned)
    ignored = _ignored_modules(pruned, cfg.ignore)
    with torch.no_grad():
        out_shape = tuple(copy.deepcopy(model).to(device).eval()(example).shape)
    for step in range(first, cfg.steps + 1):
        ratio = cfg.ratio * step / cfg.steps
        _prune_step(pruned, cfg, ratio, example, ignored, initial, data, device)
        with torch.no_grad():
            now = tuple(pruned(example).shape)
        if now != out_shape:
            raise UserError(
                f"channel pruning changed the model's output from {list(out_shape)} to "
                f"{list(now)}: add the layer that produces the output (the classifier, "
                f"e.g. 'fc') to ignore (now {cfg.ignore})"
            )
        if step < cfg.steps and train_fn is not None:
            if steps is not None:
                steps.current = step
            train_fn(pruned)
            pruned.to(device).eval()
            if steps is not None:
                steps.save(pruned, {"initial": initial})
    return pruned.eval()


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


def _refuse_grouped_convs(model: nn.Module) -> None:
    # A grouped conv (1 < groups < channels) needs the same channels removed from every
    # group; the counting here does not do that, so refuse rather than break the model.
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not (
            m.groups == m.in_channels == m.out_channels
        ):
            raise UserError(
                f"{name}: grouped convolution (groups={m.groups}) is not supported by "
                "channel pruning; only plain and depthwise convs are"
            )


def _ignored_modules(model: nn.Module, patterns: list[str]) -> list[nn.Module]:
    """The modules matched by ``patterns`` and all their submodules.

    Raises:
        UserError: a pattern matches no module (its message shows real names).
    """
    named = dict(model.named_modules())
    names = [n for n in named if n]
    ignored: dict[int, nn.Module] = {}
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            layers = [n for n in names if isinstance(named[n], nn.Conv2d | nn.Linear)]
            examples = layers[:3] + (["..."] if len(layers) > 5 else []) + layers[3:][-2:]
            raise UserError(
                f"ignore pattern {pattern!r} matches no module; module names look like: "
                f"{', '.join(examples) or 'none'} (patterns use fnmatch: 'layer4.*')"
            )
        for n in matched:
            for m in named[n].modules():
                ignored[id(m)] = m
    return list(ignored.values())


def _importance(kind: str) -> tp.importance.Importance:
    # Torch-Pruning's defaults otherwise: each channel's score is the mean over the
    # group's layers, divided by the group's mean score (comparable across groups).
    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if kind == "bn_scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.TaylorImportance()


def _taylor_gradients(model: nn.Module, data: DataBundle, device: str) -> None:
    """Accumulate loss gradients over a few calibration batches, in eval mode.

    Eval mode: BN uses its running statistics, as the deployed model will, and training
    mode would change those statistics (the model must only lose channels here).
    """
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.enable_grad():
        for i, (x, y) in enumerate(data.calib.batches(TAYLOR_BATCH_SIZE)):
            if i >= TAYLOR_BATCHES:
                break
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()


def _prune_step(
    model: nn.Module,
    cfg: ChannelPruneConfig,
    ratio: float,
    example: Tensor,
    ignored: list[nn.Module],
    initial: dict[str, int],
    data: DataBundle | None,
    device: str,
) -> None:
    """Prune ``model`` in place to ``ratio`` of the ``initial`` channel counts."""
    # Traced afresh each step: cheap, and nothing stale survives fine-tuning in between.
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                      verbose=False)
    names = {m: n for n, m in model.named_modules()}
    groups = list(graph.get_all_groups(ignored_layers=ignored,
                                       root_module_types=(nn.Conv2d, nn.Linear)))
    if not any(isinstance(dep.target.module, nn.Conv2d)
               and graph.is_out_channel_pruning_fn(dep.handler)
               for group in groups for dep, _ in group):
        raise UserError(
            "nothing to channel-prune: the model has no conv layer whose output channels "
            f"may change (no Conv2d, or ignore {cfg.ignore} covers them all)"
        )
    scorer = _importance(cfg.importance)
    if cfg.importance == "taylor":
        assert data is not None  # checked by prune_channels
        _taylor_gradients(model, data, device)

    plans: list[tuple[nn.Module, Callable, int, int, Tensor]] = []
    for group in groups:
        root, _ = group[0]
        module = root.target.module
        scores = scorer(group)
        if scores is None:  # e.g. bn_scale on a group without a BN: nothing to rank by
            continue
        current = int(graph.get_out_channels(module))
        start = initial.setdefault(names[module], current)
        plans.append((module, root.handler, current, start, scores.detach().float().cpu()))
    if cfg.importance == "taylor":
        model.zero_grad(set_to_none=True)

    if cfg.scope == "layer":
        keeps = [kept_channels(start, ratio) for _, _, _, start, _ in plans]
    else:
        keeps = _global_keeps(plans, ratio, cfg.max_layer_ratio)

    for (module, handler, current, _, scores), keep in zip(plans, keeps, strict=True):
        keep = _rounded(max(1, keep), current, cfg.round_to)
        if keep >= current:
            continue
        # The lowest scores go; a stable sort breaks ties by position, deterministically.
        drop = torch.argsort(scores, stable=True)[: current - keep]
        group = graph.get_pruning_group(module, handler, sorted(drop.tolist()))
        if graph.check_pruning_group(group):  # refuses only to empty a layer
            group.prune()


def kept_channels(channels: int, ratio: float) -> int:
    """Channels a group of ``channels`` keeps at ``ratio``: ``floor(channels * (1 - ratio))``
    as Torch-Pruning's ``MetaPruner`` keeps them (the epsilon absorbs float error such as
    64 * (1 - 0.5) landing a hair below 32); the caller guarantees at least one."""
    return math.floor(channels * (1 - ratio) + _EPS)


def _global_keeps(
    plans: list[tuple[nn.Module, Callable, int, int, Tensor]], ratio: float, max_layer: float
) -> list[int]:
    """Channels each group keeps when all groups' channels are ranked together."""
    currents = [current for _, _, current, _, _ in plans]
    total_start = sum(start for _, _, _, start, _ in plans)
    to_remove = sum(currents) - kept_channels(total_start, ratio)
    # No group may fall below this many (a capped group's share goes to the next-lowest).
    floors = [max(1, math.ceil(start * (1 - max_layer) - _EPS)) for _, _, _, start, _ in plans]
    room = [max(0, c - f) for c, f in zip(currents, floors, strict=True)]
    owners = torch.cat([torch.full((len(s),), i) for i, (*_, s) in enumerate(plans)])
    order = torch.argsort(torch.cat([s for *_, s in plans]), stable=True)
    removed = [0] * len(plans)
    for owner in owners[order].tolist():
        if to_remove <= 0:
            break
        if removed[owner] < room[owner]:
            removed[owner] += 1
            to_remove -= 1
    return [c - r for c, r in zip(currents, removed, strict=True)]


def _rounded(keep: int, current: int, round_to: int | None) -> int:
    """``keep`` rounded down to a multiple of ``round_to``, within [round_to, current]."""
    if round_to is None or round_to <= 1:
        return keep
    return min(current, max(round_to, keep - keep % round_to))
