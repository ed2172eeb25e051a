"""The channel-group engine: coupled channels found, scored and removed on Torch-Pruning's graph.

Every structured (channel) pruning in netshrink goes through here: ``prune.channel``
(uniform or global ratios, iterative steps, rounding) and the sensitivity scan and
search (one group, or every group, at one ratio). The steps:

1. ``ChannelGraph(model, example_input)`` traces the model once with Torch-Pruning's
   ``DependencyGraph`` (in place: the caller passes a copy it may change), watching for
   reshapes that mix channels (``prune.tracing``).
2. ``graph.groups(ignored)`` enumerates the *coupled groups*: a conv's filters, its batch
   norm, the next conv's input channels and, across a residual add, every conv, BN and
   shortcut that writes into the same tensor. Each ``ChannelGroup`` names its member
   layers and counts the parameters its channels hold. A group that would take output
   channels from an ``ignored`` module (the classifier, whose outputs are the classes) is
   not offered; such a module may still lose *input* channels. Nor is a group whose
   channels pass through a channel shuffle or another reshape that mixes them (its name
   goes to ``graph.kept_whole``).
3. ``graph.scores(groups, importance)`` scores every group's channels, all before any
   surgery (so the order groups are pruned in does not matter).
4. ``graph.prune_to(group, scores, keep)`` keeps the ``keep`` best-scored channels and
   removes the rest from every member at once (``graph.remove`` removes given indices).

Grouped convolutions (ResNeXt, RegNet: ``1 < groups``, not depthwise) split a group's
channels into ``blocks`` equal blocks, one per conv group; every block must lose the same
positions, or the conv could not keep equal groups. ``prune_to`` scores a position by its
mean over the blocks (as Torch-Pruning's ``MetaPruner`` does), keeps a multiple of
``blocks`` channels and removes the same positions from each. Depthwise convs (``groups
== channels``) couple their input and output channels instead, as Torch-Pruning models.

Importances: Torch-Pruning's criteria ``l1`` / ``l2`` (group norms: output filters, input
slices and BN scales of every member, averaged over the members and divided by the
group's mean, so that groups compare in a global ranking), ``bn_scale`` and ``taylor``
(|weight x gradient| from a few calibration batches); and ``filter_l1``, the L1 norms of
the filters that produce a channel summed over the group's output layers (no input
slices, no BN, no normalisation), which the sensitivity scan and search rank by. The
two L1 criteria are different rankings: each caller keeps the one it always used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from netshrink.errors import UserError
from netshrink.limits import clip
from netshrink.models.select import prunable_layers
from netshrink.prune.tracing import refuse_attention, trace_dependencies

if TYPE_CHECKING:
    from netshrink.data import DataBundle

__all__ = [
    "FLOAT_SLACK",
    "ChannelGraph",
    "ChannelGroup",
    "Importance",
    "check_importance",
    "kept_channels",
    "lowest",
    "output_layer",
    "output_shape",
]

Importance = Literal["l1", "l2", "bn_scale", "taylor", "filter_l1"]

# Taylor importance: gradients summed over this many calibration batches of this size.
# Enough for a stable ranking, small enough to take seconds on a CPU.
TAYLOR_BATCHES = 4
TAYLOR_BATCH_SIZE = 64

# Slack for float error in ``c * (1 - ratio)``: 10 * (1 - 0.3) is 6.999..., not 7.
FLOAT_SLACK = 1e-9


@dataclass(frozen=True)
class ChannelGroup:
    """One coupled group of channels: removing channel i removes it from every member.

    Attributes:
        name: ``outputs`` joined with ``+`` (model order): what a scan row calls it.
        root: the conv/linear the dependency graph grew the group from.
        outputs: conv/linear layers that lose output channels (filters).
        inputs: conv/linear layers that lose input channels.
        norms: batch norms that lose channels.
        channels: channels in the group.
        params: conv/linear/BN parameters the group's channels hold (all of them gone if
            every channel went).
        order: position of its first output layer in ``model.named_modules()``.
        convs: whether a conv loses output channels in it (not only linear layers).
        blocks: the equal blocks its channels come in (a grouped conv's groups; 1 for
            none): each block loses the same positions.
        group: Torch-Pruning's group (every channel), what ``ChannelGraph`` works on.
    """

    name: str
    root: str
    outputs: list[str]
    inputs: list[str]
    norms: list[str]
    channels: int
    params: int
    order: int
    convs: bool = field(default=False, repr=False, compare=False)
    blocks: int = 1
    group: Any = field(default=None, repr=False, compare=False)


def output_layer(model: nn.Module) -> str:
    """The classifier: the last conv/linear layer in model order (its outputs are logits).

    Raises:
        UserError: the model has no conv/linear layer.
    """
    layers = prunable_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no Conv2d or Linear layer: nothing to prune")
    return list(layers)[-1]


def output_shape(pruned: nn.Module, example_input: Tensor) -> tuple[int, ...]:
    """The shape of ``pruned``'s output on ``example_input``.

    Raises:
        UserError: the pruned model no longer runs: its forward fixes a width in code (a
            reshape to a constant size) that the pruning changed.
    """
    try:
        with torch.no_grad():
            return tuple(pruned(example_input).shape)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise UserError(
            f"the channel-pruned {type(pruned).__name__} no longer runs "
            f"({type(exc).__name__}: {clip(str(exc), 160)}): its forward fixes a width in "
            "code (a reshape or view to a constant size?) that the pruning changed; "
            "exclude the layer that feeds it (exclude=[...])") from None


def kept_channels(channels: int, ratio: float) -> int:
    """Channels a group of ``channels`` keeps at ``ratio``: ``floor(channels * (1 - ratio))``
    as Torch-Pruning's ``MetaPruner`` keeps them (the epsilon absorbs float error such as
    64 * (1 - 0.5) landing a hair below 32); the caller guarantees at least one."""
    return math.floor(channels * (1 - ratio) + FLOAT_SLACK)


def check_importance(importance: str, data: DataBundle | None) -> None:
    """Raise ``UserError`` if ``importance`` needs data (``taylor``) and there is none."""
    if importance == "taylor" and data is None:
        raise UserError("importance 'taylor' needs data for its gradients; "
                        "use 'l1', 'l2' or 'bn_scale', or pass the data")


def lowest(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores, sorted; ties go by position (a stable sort)."""
    return sorted(int(i) for i in torch.argsort(scores, stable=True)[:k])


class ChannelGraph:
    """One traced model: its coupled channel groups, their scores, and the surgery.

    Args:
        model: the model to prune *in place* (pass a copy to keep the original), in eval
            mode: a training-mode forward would move BN running statistics, and
            netshrink's ``Conv2d`` computes 1x1-output convs as a matmul in training,
            which the tracer would not recognise as a conv.
        example_input: one batch the model accepts, on its device.

    Attributes:
        kept_whole: after ``groups``, the groups not offered because a reshape mixes
            their channels (a channel shuffle) or a grouped conv sees them reordered.

    Raises:
        UserError: the model has attention, or cannot be traced (one line each).
    """

    def __init__(self, model: nn.Module, example_input: Tensor) -> None:
        refuse_attention(model)
        self.model = model
        self.graph, self._watch = trace_dependencies(model, example_input)
        self.kept_whole: list[str] = []
        self._modules = dict(model.named_modules())
        self._names = {id(m): name for name, m in self._modules.items()}
        self._order = {name: i for i, name in enumerate(self._modules)}

    def groups(self, ignored: Iterable[nn.Module] = ()) -> list[ChannelGroup]:
        """Every coupled group rooted at a conv/linear layer, in Torch-Pruning's order.

        Args:
            ignored: modules whose output channels must stay; a group that would remove
                any of them is left out (with its root, when a member is ignored).
        """
        found = self.graph.get_all_groups(ignored_layers=list(ignored),
                                          root_module_types=(nn.Conv2d, nn.Linear))
        offered: list[ChannelGroup] = []
        self.kept_whole = []
        for group in found:
            described = self._describe(group)
            if described.blocks < 1 or any(self._mixed(item) for item in group.items):
                self.kept_whole.append(described.name)
            else:
                offered.append(described)
        return offered

    def _mixed(self, item: Any) -> bool:
        """Whether this member of a group loses channels that a channel-mixing call
        (``prune.tracing``) reads or made: a conv or linear layer reading its result only
        on its inputs, any other member (a norm, an add, a concatenation) either way."""
        node = item.dep.target
        if self._watch.feeds(node.grad_fn):
            return True
        if not self._watch.reads(node.grad_fn):
            return False
        module = node.module
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d)
                                             and not _depthwise(module)):
            return not self.graph.is_out_channel_pruning_fn(item.dep.handler)
        return True

    def _blocks(self, group: Any, channels: int) -> int:
        """The equal blocks a group's channels come in: the least common multiple of the
        groups of its grouped convs (1 without any); 0 when a grouped conv sees the
        channels other than in the root's order, or they do not divide evenly (the group
        is then kept whole)."""
        blocks = 1
        for item in group.items:
            module = item.dep.target.module
            if not isinstance(module, nn.Conv2d) or module.groups == 1 or _depthwise(module):
                continue
            out = self.graph.is_out_channel_pruning_fn(item.dep.handler)
            width = module.out_channels if out else module.in_channels
            if width != channels or list(item.idxs) != list(item.root_idxs):
                return 0
            blocks = math.lcm(blocks, module.groups)
        return blocks if channels % blocks == 0 else 0

    def _describe(self, group: Any) -> ChannelGroup:
        outputs: list[str] = []
        inputs: list[str] = []
        norms: list[str] = []
        params = 0
        for item in group.items:
            module = item.dep.target.module
            name = self._names.get(id(module))
            if name is None:  # an op (add, reshape), not a module with weights
                continue
            out = self.graph.is_out_channel_pruning_fn(item.dep.handler)
            params += _channel_params(module, out) * len(item.idxs)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                (outputs if out else inputs).append(name)
            elif out:
                norms.append(name)
        for names in (outputs, inputs, norms):
            names.sort(key=self._order.__getitem__)
        root = self._names[id(group[0].dep.target.module)]
        channels = len(group[0].idxs)
        return ChannelGroup(
            name="+".join(outputs), root=root, outputs=outputs, inputs=inputs, norms=norms,
            channels=channels, params=params,
            order=self._order[outputs[0]] if outputs else len(self._order),
            convs=any(isinstance(self._modules[n], nn.Conv2d) for n in outputs),
            blocks=self._blocks(group, channels), group=group,
        )

    def scores(
        self,
        groups: Sequence[ChannelGroup],
        importance: Importance,
        *,
        data: DataBundle | None = None,
        device: str = "cpu",
    ) -> list[Tensor | None]:
        """Each group's channel scores (low: removed first), taken before any surgery.

        ``None`` for a group the criterion cannot rank (``bn_scale`` without a BN).
        ``taylor`` takes gradients on ``data.calib`` (in eval mode: BN uses its running
        statistics, as the deployed model will) and clears them afterwards.

        Raises:
            UserError: ``taylor`` without data.
        """
        if importance == "filter_l1":
            return [self._filter_l1(g) for g in groups]
        check_importance(importance, data)
        if importance == "taylor":
            assert data is not None
            _taylor_gradients(self.model, data, device)
        scorer = _criterion(importance)
        try:
            found = [scorer(g.group) for g in groups]
            return [None if s is None else s.detach().float().cpu() for s in found]
        finally:
            if importance == "taylor":
                self.model.zero_grad(set_to_none=True)

    def _filter_l1(self, group: ChannelGroup) -> Tensor:
        """The L1 norms of the filters producing each channel, summed over the group."""
        scores = torch.zeros(group.channels, dtype=torch.float64)
        for item in group.group.items:
            module = item.dep.target.module
            if not (isinstance(module, (nn.Conv2d, nn.Linear))
                    and id(module) in self._names
                    and self.graph.is_out_channel_pruning_fn(item.dep.handler)):
                continue
            l1 = module.weight.detach().abs().flatten(1).sum(1).double().cpu()
            idx = torch.as_tensor(list(item.idxs), dtype=torch.long)
            root = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
            scores.index_add_(0, root, l1[idx])
        return scores

    def prune_to(self, group: ChannelGroup, scores: Tensor, keep: int) -> bool:
        """Keep the ``keep`` best-scored channels of ``group`` (lowest scores go, ties by
        position) and remove the rest from every member; False (nothing removed) if that
        would empty a layer.

        With ``blocks`` > 1 a position's score is its mean over the blocks, ``keep`` is
        rounded down to a multiple of ``blocks`` (at least one per block), and the same
        positions go from every block.
        """
        blocks = max(1, group.blocks)
        width = group.channels // blocks
        per_block = min(width, max(1, keep // blocks))
        if per_block >= width:
            return True
        positions = lowest(scores.reshape(blocks, width).mean(0), width - per_block)
        return self.remove(group, [b * width + p for b in range(blocks) for p in positions])

    def remove(self, group: ChannelGroup, indices: Sequence[int]) -> bool:
        """Remove channels ``indices`` of ``group`` from every member; False (and nothing
        removed) if that would empty a layer.

        The group is rebuilt from its root with these indices, so it stays valid after
        other groups (disjoint outputs) were pruned.
        """
        root = group.group[0].dep
        chosen = self.graph.get_pruning_group(root.target.module, root.handler,
                                              sorted(indices))
        if not self.graph.check_pruning_group(chosen):
            return False
        chosen.prune()
        return True


def _depthwise(conv: nn.Conv2d) -> bool:
    """Torch-Pruning's test: one filter per channel, input and output coupled."""
    return conv.groups == conv.out_channels and conv.out_channels > 1


def _channel_params(module: nn.Module, out: bool) -> int:
    """Parameters one channel of ``module`` holds along its output (or input) dimension."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return 2 if module.affine else 0
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        w = module.weight
        if out:
            return w[0].numel() + (1 if module.bias is not None else 0)
        # One input position of a grouped conv's weight serves ``groups`` input channels.
        groups = module.groups if isinstance(module, nn.Conv2d) else 1
        return w[:, 0].numel() // groups
    return 0  # element-wise ops, reshapes: nothing to hold


def _criterion(kind: str) -> tp.importance.Importance:
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
