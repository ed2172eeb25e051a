"""Give a freshly built model the layer widths of a (channel-pruned) state dict.

A channel-pruned model is stored as data, never as a pickled module: its builder (the
``ModelSpec`` with ``pruned=True``, or the user's trusted factory) builds the unpruned
architecture, and the tensor shapes in the weights file say how many channels each layer
kept. ``resize_to_state`` gives every layer whose tensors differ the file's widths, in
place, so ``load_state_dict(strict=True)`` then fits exactly. The forward code needs no
change: it only wires layers together, and pruning kept every coupled layer consistent.

What channel pruning changes, and so what is resized (the layer keeps its class, so a
subclass such as netshrink's ``Conv2d`` or torchvision's ``LayerNorm2d`` stays one):

* convolutions: in/out channels, never the kernel; a depthwise conv's groups follow its
  width, a grouped conv (ResNeXt, RegNet) keeps its groups, each narrower;
* batch and instance norms, layer norms (``normalized_shape``, which their forward
  reads), group norms (their groups stay) and PReLU: their channels;
* linear layers: in/out features;
* any other parameter or buffer a module holds itself (ConvNeXt's layer scale, a
  per-channel scale of the user's): its shape, when only sizes differ.

Anything else is left alone, so ``load_state_dict`` still reports it as a mismatch:
another kernel size or number of dimensions, a width the state would leave without a
channel (pruning keeps at least one), a grouped conv's outputs that no longer divide into
its groups. A layer's tensors all take the width of its weight (or running mean), so a
file whose bias disagrees with its weight is reported too. The new tensors' values are
placeholders (``torch.empty``) until the state dict is loaded into them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

__all__ = ["resize_to_state"]


def resize_to_state(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Give, in place, each layer whose width differs from ``state``'s the state's width.

    Args:
        model: the model built unpruned (on any device, ``meta`` included); changed.
        state: the state dict to be loaded (parameter names as ``model.state_dict()``).

    Returns:
        ``model`` itself.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, _ConvNd):
            _conv(module, state.get(prefix + "weight"))
        elif isinstance(module, _NormBase):
            _norm(module, state, prefix)
        elif isinstance(module, nn.LayerNorm):
            _layer_norm(module, state.get(prefix + "weight"))
        elif isinstance(module, nn.GroupNorm):
            _group_norm(module, state.get(prefix + "weight"))
        elif isinstance(module, nn.Linear):
            _linear(module, state.get(prefix + "weight"))
        elif isinstance(module, nn.PReLU):
            _prelu(module, state.get(prefix + "weight"))
        else:
            _own_tensors(module, state, prefix)
    return model


def _replace(module: nn.Module, attr: str, shape: Sequence[int]) -> None:
    """``module.attr`` (a parameter or buffer, if it has one) as an empty tensor of
    ``shape``, on the old one's device and dtype."""
    old = getattr(module, attr, None)
    if not isinstance(old, Tensor) or tuple(old.shape) == tuple(shape):
        return
    new = torch.empty(tuple(shape), device=old.device, dtype=old.dtype)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, new)


def _width(weight: Tensor | None, old: Tensor | None, dims: int) -> bool:
    """Whether ``weight`` is a new width for ``old``: another shape of ``dims``
    dimensions, none of them empty."""
    return (weight is not None and old is not None and weight.ndim == dims == old.ndim
            and weight.shape != old.shape and min(weight.shape) >= 1)


def _conv(conv: _ConvNd, weight: Tensor | None) -> None:
    old = conv.weight
    if conv.transposed or not _width(weight, old, old.ndim):
        return
    assert weight is not None
    if weight.shape[2:] != old.shape[2:]:
        return  # a different kernel is another architecture, not a pruned one
    out_channels = int(weight.shape[0])
    if conv.groups == 1:
        groups, in_channels = 1, int(weight.shape[1])
    elif conv.groups == conv.in_channels == conv.out_channels and weight.shape[1] == 1:
        # Depthwise: pruning removes whole channel-filters, so the groups follow the width.
        groups = in_channels = out_channels
    else:
        # Grouped conv: the group count stays, each group is narrower.
        groups, in_channels = conv.groups, int(weight.shape[1]) * conv.groups
        if out_channels % groups:
            return
    conv.in_channels, conv.out_channels, conv.groups = in_channels, out_channels, groups
    _replace(conv, "weight", weight.shape)
    _replace(conv, "bias", [out_channels])


def _norm(norm: _NormBase, state: dict[str, Tensor], prefix: str) -> None:
    # Without affine parameters the running mean is the only tensor that has the width.
    ref = state.get(prefix + "weight", state.get(prefix + "running_mean"))
    own = norm.weight if norm.weight is not None else norm.running_mean
    if not _width(ref, own, 1):
        return
    assert ref is not None
    norm.num_features = int(ref.shape[0])
    for attr in ("weight", "bias", "running_mean", "running_var"):
        _replace(norm, attr, [norm.num_features])


def _layer_norm(norm: nn.LayerNorm, weight: Tensor | None) -> None:
    if not _width(weight, norm.weight, len(norm.normalized_shape)):
        return
    assert weight is not None
    norm.normalized_shape = tuple(int(d) for d in weight.shape)
    _replace(norm, "weight", weight.shape)
    _replace(norm, "bias", weight.shape)


def _group_norm(norm: nn.GroupNorm, weight: Tensor | None) -> None:
    if not _width(weight, norm.weight, 1) or int(weight.shape[0]) % norm.num_groups:  # type: ignore[union-attr]
        return
    assert weight is not None
    norm.num_channels = int(weight.shape[0])
    _replace(norm, "weight", weight.shape)
    _replace(norm, "bias", weight.shape)


def _linear(linear: nn.Linear, weight: Tensor | None) -> None:
    if not _width(weight, linear.weight, 2):
        return
    assert weight is not None
    linear.out_features, linear.in_features = (int(d) for d in weight.shape)
    _replace(linear, "weight", weight.shape)
    _replace(linear, "bias", [linear.out_features])


def _prelu(prelu: nn.PReLU, weight: Tensor | None) -> None:
    if prelu.num_parameters == 1 or not _width(weight, prelu.weight, 1):
        return  # one slope shared by every channel has no width
    assert weight is not None
    prelu.num_parameters = int(weight.shape[0])
    _replace(prelu, "weight", weight.shape)


def _own_tensors(module: nn.Module, state: dict[str, Tensor], prefix: str) -> None:
    """The parameters and buffers ``module`` holds itself (not its layers'), each given
    the state's shape when only its sizes differ."""
    for attr, old in [*module._parameters.items(), *module._buffers.items()]:
        new = state.get(prefix + attr)
        if old is not None and _width(new, old, old.ndim):
            assert new is not None
            _replace(module, attr, new.shape)
