"""Tracing a model for Torch-Pruning's dependency graph, and what that graph cannot see.

Torch-Pruning follows channels through autograd: a convolution's output channel ``i`` is
the next layer's input channel ``i``, across adds, concatenations, splits and flattens. A
reshape that splits or folds the channel dimension is outside that model: ShuffleNet's
channel shuffle (view ``[N, g, C/g, H, W]``, transpose, view back) permutes channels, and
the graph either treats it as channel ``i`` -> ``i`` (wrong) or fails while mapping it;
pixel shuffles fold channels into space. While the graph is traced, ``ChannelMixWatch``
cuts the autograd graph at every such call (Torch-Pruning's ``forward_fn`` and
``output_transform`` hooks: the tensor before the cut becomes an extra output); the
groups whose channels reach a cut, from either side, are then kept whole (see
``prune.groups``), and every other group is pruned as usual. So ShuffleNetV2 loses the
channels inside each branch, and keeps those its shuffles carry.

A model with ``nn.MultiheadAttention`` (a vision transformer) is refused with one line:
its heads and embedding width are fixed in its code and in the layer itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from netshrink.errors import UserError
from netshrink.limits import clip

__all__ = ["ChannelMixWatch", "refuse_attention", "trace_dependencies"]

# Calls that change a tensor's shape without computing: each is checked against the rule
# of ``keeps_channels``.
_RESHAPES = frozenset({
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten,
    torch.flatten, torch.Tensor.unflatten, torch.unflatten, torch.Tensor.view_as,
    torch.Tensor.reshape_as,
})
# Calls that always move channels into space (or back) or permute them.
_MIXERS = frozenset({
    torch.pixel_shuffle, torch.pixel_unshuffle, torch.channel_shuffle,
    torch.native_channel_shuffle,
})


def keeps_channels(before: Sequence[int], after: Sequence[int]) -> bool:
    """Whether a reshape from ``before`` to ``after`` leaves every channel a whole unit
    that Torch-Pruning's graph maps correctly.

    NCHW feature maps (4-D) keep their batch and channel dimensions (``[N, C]``,
    ``[N, C, H*W]``) or flatten whole (``[N, C*H*W]``, before a linear layer); a 2-D
    ``[N, F]`` keeps both; a 3-D ``[N, L, C]`` keeps its last. Anything else (a split of
    the channels into groups, a 5-D tensor) mixes them.
    """
    before, after = tuple(before), tuple(after)
    if before == after or len(before) <= 1:
        return True
    if len(before) == 4:
        return after[:2] == before[:2] or after == (before[0], math.prod(before[1:]))
    if len(before) == 3:
        return after[-1:] == before[-1:] and math.prod(after) == math.prod(before)
    if len(before) == 2:
        return after[:2] == before[:2]
    return False


class ChannelMixWatch(TorchFunctionMode):
    """While active, every call that mixes channels (``keeps_channels`` says no, or a
    pixel/channel shuffle) on a tensor autograd tracks cuts the autograd graph there:
    its result is a fresh leaf with the same values, so the dependency graph neither maps
    channels through the call nor fails trying. The tensor it was called on becomes an
    extra output of the trace (``exits``), so the layers before it are still traced.

    ``feeds`` and ``reads`` then name the graph nodes on either side of a cut, and the
    groups holding one keep their channels.

    Attributes:
        seen: each call, in words (``view [1, 116, 28, 28] -> [1, 2, 58, 28, 28]``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self._inputs: list[Tensor] = []  # what each mixing call was made on
        self._exits: set[object] = set()  # autograd nodes of their stand-in outputs
        self._leaves: dict[int, Tensor] = {}  # the leaves standing for their results

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func not in _RESHAPES and func not in _MIXERS:
            return out
        x = args[0] if args else None
        if not (isinstance(x, Tensor) and isinstance(out, Tensor) and x.requires_grad):
            return out
        if func in _RESHAPES and keeps_channels(x.shape, out.shape):
            return out
        if x.grad_fn is not None:
            self._inputs.append(x)
        leaf = out.detach().requires_grad_()
        self._leaves[id(leaf)] = leaf  # kept alive: ids stay unique while tracing
        self.seen.append(f"{getattr(func, '__name__', 'reshape')} {list(x.shape)} -> "
                         f"{list(out.shape)}")
        return leaf

    def exits(self, out: Any) -> list[Any]:
        """``out`` and a copy of each tensor a mixing call was made on: what the graph
        is traced back from (a copy, so the layer or concatenation that made the tensor
        stays what it is in the graph)."""
        copies = [x.clone() for x in self._inputs]
        self._exits.update(c.grad_fn for c in copies)
        return [out, *copies]

    def feeds(self, grad_fn: object) -> bool:
        """Whether ``grad_fn`` is the stand-in output of a tensor a mixing call read."""
        return grad_fn in self._exits

    def reads(self, grad_fn: object) -> bool:
        """Whether the graph node of ``grad_fn`` reads the result of a mixing call."""
        inputs = getattr(grad_fn, "next_functions", None) or ()
        return any(id(getattr(f, "variable", None)) in self._leaves for f, _ in inputs
                   if f is not None)


def refuse_attention(model: nn.Module) -> None:
    """Raise ``UserError`` for a model with ``nn.MultiheadAttention`` layers.

    (A hand-written attention's reshapes to heads are caught by ``ChannelMixWatch``
    instead: the channels they split stay, the rest of the model is pruned.)

    Raises:
        UserError: the model has one.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            raise UserError(
                f"channel pruning works on convolutional networks; {type(model).__name__} "
                f"has attention ({name or 'the model'}: {type(module).__name__}), whose "
                "head and embedding widths are fixed; prune it unstructured instead "
                "(MagnitudePruneConfig or NMPruneConfig; prune.magnitude, prune.nm)")


def trace_dependencies(model: nn.Module, example_input: Tensor
                       ) -> tuple[Any, ChannelMixWatch]:
    """Torch-Pruning's dependency graph of ``model`` traced on ``example_input``, and the
    channel-mixing calls seen while tracing.

    Raises:
        UserError: the model does not run on the example, or the graph cannot be built
            (one line naming the error).
    """
    watch = ChannelMixWatch()

    def forward(m: nn.Module, x: Tensor) -> Any:
        with watch:
            return m(x)

    name = type(model).__name__
    with torch.enable_grad():  # the graph is traced through autograd
        try:
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, forward_fn=forward,
                output_transform=watch.exits, verbose=False)
        except UserError:
            raise
        except Exception as exc:  # the model's forward or the tracer: one line either way
            shape = "x".join(map(str, example_input.shape))
            raise UserError(
                f"channel pruning cannot trace {name} on a {shape} input "
                f"({type(exc).__name__}: {clip(str(exc), 200)}); check that example_input "
                "is a batch the model takes, else prune it unstructured (MagnitudePruneConfig "
                "or NMPruneConfig)"
            ) from None
    return graph, watch
