"""Batch-norm folding: each ``Conv2d -> BatchNorm2d`` pair becomes one conv with a bias.

In eval semantics a BN is a per-channel affine map, ``y = (x - mean) * g + beta`` with
``g = gamma / sqrt(var + eps)``; after a conv it folds into the conv's weights and bias:
``w' = w * g`` (per output channel) and ``b' = (b - mean) * g + beta``. The BN becomes an
``nn.Identity``. This is what an exported graph runs anyway, and what quantization-aware
training must see, so that the weights it puts on the int8 grid are the ones deployed.

Pairs are found on a ``torch.fx`` graph (convs, BNs and linears are leaves, so our
``Conv2d`` subclass and its training-only shortcut are never traced into): a BN pairs with
the conv whose output it takes, when that output feeds nothing else. A model fx cannot
trace falls back to torchvision's names (``conv1``/``bn1``, ``convK``/``bnK``,
``downsample.0``/``downsample.1``).
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx as fx
from torch import Tensor, nn

from netshrink.errors import UserError

__all__ = ["batchnorm_pairs", "fold_batchnorm"]


class _LeafTracer(fx.Tracer):
    """Keeps convs, BNs and linears (and their subclasses) as single graph nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.Linear):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def batchnorm_pairs(model: nn.Module) -> dict[str, str]:
    """The conv that feeds each ``BatchNorm2d`` of ``model``.

    Args:
        model: any module; traced with ``torch.fx`` when possible, else paired by
            torchvision's module names.

    Returns:
        ``{bn_name: conv_name}`` for every BatchNorm2d the forward pass uses, in model order.

    Raises:
        UserError: a BatchNorm2d does not directly follow a Conv2d whose output only it
            reads, or its channels do not match the conv's.
    """
    modules = dict(model.named_modules())
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # dynamic control flow and friends: fall back to names
        pairs = _pairs_by_name(modules)
    else:
        pairs = _pairs_from_graph(graph, modules)
    for bn_name, conv_name in pairs.items():
        bn, conv = modules[bn_name], modules[conv_name]
        assert isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d)
        if conv.out_channels != bn.num_features:
            raise UserError(
                f"BatchNorm2d {bn_name!r} has {bn.num_features} channels but the conv before "
                f"it, {conv_name!r}, has {conv.out_channels} outputs: the model is inconsistent"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise UserError(
                f"BatchNorm2d {bn_name!r} keeps no running statistics "
                "(track_running_stats=False), so it has no eval-time form to fold"
            )
    return pairs


def _pairs_from_graph(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[str, str]:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        bn_name = str(node.target)
        src = node.args[0] if node.args else None
        ok = (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(modules[str(src.target)], nn.Conv2d)
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
        )
        if not ok:
            raise UserError(
                f"BatchNorm2d {bn_name!r} does not directly follow a Conv2d (used once, its "
                "output read only by the BN), so it cannot be folded; quantization-aware "
                "training supports conv -> BN -> ... networks such as the ResNets"
            )
        pairs[bn_name] = str(src.target)  # type: ignore[union-attr]
    return pairs


def _conv_name_for(bn_name: str) -> str | None:
    parent, _, leaf = bn_name.rpartition(".")
    prefix = f"{parent}." if parent else ""
    if leaf.startswith("bn"):
        return f"{prefix}conv{leaf[2:]}"
    if leaf.isdigit() and int(leaf) > 0:  # inside an nn.Sequential: the module before it
        return f"{prefix}{int(leaf) - 1}"
    return None


def _pairs_by_name(modules: dict[str, nn.Module]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for name, m in modules.items():
        if not isinstance(m, nn.BatchNorm2d):
            continue
        conv_name = _conv_name_for(name)
        if conv_name is None or not isinstance(modules.get(conv_name), nn.Conv2d):
            raise UserError(
                f"cannot find the conv before BatchNorm2d {name!r}: the model does not trace "
                "with torch.fx and does not use torchvision's names (conv1/bn1, "
                "downsample.0/downsample.1), so its batch norms cannot be folded"
            )
        pairs[name] = conv_name
    return pairs


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    dtype = conv.weight.dtype
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    g = gamma / torch.sqrt(var + bn.eps)
    bias: Tensor = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    weight = conv.weight.double() * g.view(-1, 1, 1, 1)
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(((bias - mean) * g + beta).to(dtype))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d folded into the conv before it.

    Args:
        model: a network of conv -> BN pairs (any ResNet here, pruned or not); not changed.

    Returns:
        A deep copy in eval mode: each paired conv carries the BN's scale in its weights
        and a bias, and each BN is an ``nn.Identity``. Module names are unchanged. Its eval
        output equals the original's eval output up to float rounding.

    Raises:
        UserError: a BatchNorm2d cannot be paired with the conv before it (see
            ``batchnorm_pairs``).
    """
    folded = copy.deepcopy(model).eval()
    pairs = batchnorm_pairs(folded)
    modules = dict(folded.named_modules())
    for bn_name, conv_name in pairs.items():
        bn, conv = modules[bn_name], modules[conv_name]
        assert isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d)
        _fold_into(conv, bn)
        folded.set_submodule(bn_name, nn.Identity())
    return folded
