"""Give a freshly built model the layer widths of a (channel-pruned) state dict.

A channel-pruned model is stored as data, never as a pickled module: its ``ModelSpec``
(with ``pruned=True``) rebuilds the unpruned architecture, and the tensor shapes in the
weights file say how many channels each layer kept. ``resize_to_state`` swaps every
conv, batch norm and linear layer whose shape differs for one of the file's shape, so
``load_state_dict(strict=True)`` then fits exactly. The forward code needs no change:
it only wires layers together, and pruning kept every coupled layer consistent.
"""

from __future__ import annotations

from torch import Tensor, nn

from netshrink.models.resnet import Conv2d

__all__ = ["resize_to_state"]


def resize_to_state(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Replace, in place, each layer whose width differs from ``state``'s.

    Only widths change: in/out channels of ``nn.Conv2d`` (our ``Conv2d`` subclass stays
    our subclass, with the same kernel, stride, padding, dilation and bias), features of
    ``nn.BatchNorm2d`` and ``nn.Linear``. A layer whose tensor is missing from ``state``
    or differs in anything but width (a conv's kernel size, the number of dimensions) is
    left alone, so ``load_state_dict`` still reports it as a mismatch; so is one the state
    would leave without a channel (pruning keeps at least one). The new layers' values
    are placeholders until the state dict is loaded into them.

    Args:
        model: the model built from the unpruned spec; changed in place.
        state: the state dict to be loaded (parameter names as ``model.state_dict()``).

    Returns:
        ``model`` itself (a new layer only when ``model`` is itself one resized layer).
    """
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Conv2d):
            new = _conv(module, state.get(prefix + "weight"))
        elif isinstance(module, nn.BatchNorm2d):
            new = _batchnorm(module, state, prefix)
        elif isinstance(module, nn.Linear):
            new = _linear(module, state.get(prefix + "weight"))
        else:
            continue
        if new is None:
            continue
        new.train(module.training)
        if name:
            model.set_submodule(name, new)
        else:  # the model is itself one layer: nothing to attach it to, so reshape it
            model = new
    return model


def _conv(conv: nn.Conv2d, weight: Tensor | None) -> nn.Conv2d | None:
    old = conv.weight
    if weight is None or weight.shape == old.shape:
        return None
    if weight.ndim != 4 or weight.shape[2:] != old.shape[2:]:
        return None  # a different kernel is another architecture, not a pruned one
    out_channels = int(weight.shape[0])
    if min(weight.shape) < 1:
        return None  # pruning never removes every channel of a layer
    if conv.groups == 1:
        groups, in_channels = 1, int(weight.shape[1])
    elif conv.groups == conv.in_channels == conv.out_channels and weight.shape[1] == 1:
        # Depthwise: pruning removes whole channel-filters, so the groups follow the width.
        groups = in_channels = out_channels
    else:
        # Grouped conv: the group count stays, each group is narrower.
        groups, in_channels = conv.groups, int(weight.shape[1]) * conv.groups
    cls = Conv2d if isinstance(conv, Conv2d) else nn.Conv2d
    return cls(
        in_channels,
        out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=old.device,
        dtype=old.dtype,
    )


def _batchnorm(bn: nn.BatchNorm2d, state: dict[str, Tensor], prefix: str) -> nn.BatchNorm2d | None:
    # Without affine parameters the running mean is the only tensor that has the width.
    ref = state.get(prefix + "weight", state.get(prefix + "running_mean"))
    if ref is None or ref.ndim != 1 or ref.shape[0] in (0, bn.num_features):
        return None
    own = bn.weight if bn.weight is not None else bn.running_mean
    return nn.BatchNorm2d(
        int(ref.shape[0]),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=own.device if own is not None else None,
        dtype=own.dtype if own is not None else None,
    )


def _linear(linear: nn.Linear, weight: Tensor | None) -> nn.Linear | None:
    old = linear.weight
    if weight is None or weight.shape == old.shape or weight.ndim != 2 or 0 in weight.shape:
        return None
    return nn.Linear(
        int(weight.shape[1]),
        int(weight.shape[0]),
        bias=linear.bias is not None,
        device=old.device,
        dtype=old.dtype,
    )
