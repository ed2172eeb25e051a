"""Masks: which weights are pruned, kept at zero through every optimizer step after.

A mask is a bool tensor shaped like a layer's ``weight`` (True = kept). Masks are applied
by multiplying the weights in place, and a ``MaskHook`` re-applies them after every
optimizer step of the one training loop, so momentum and weight decay cannot revive a
pruned weight. Between stages nothing but the weights travels: a weight that is exactly
zero is taken as pruned (a trained float weight is never exactly 0.0 by chance).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from netshrink.models.select import prunable_layers

Masks = dict[str, Tensor]


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every masked-out weight of ``model`` in place."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


class MaskHook:
    """A training-loop step hook that keeps pruned weights at exactly zero."""

    def __init__(self, masks: Masks) -> None:
        self.masks = masks

    def __call__(self, model: nn.Module) -> None:
        apply_masks(model, self.masks)


def zero_masks(model: nn.Module) -> Masks:
    """Masks of the conv/linear layers that hold exact zeros (i.e. were pruned)."""
    masks: Masks = {}
    for name, layer in prunable_layers(model).items():
        kept = layer.weight.detach() != 0
        if not bool(kept.all()):
            masks[name] = kept
    return masks


def sparsity_table(model: nn.Module) -> list[dict[str, float | int | str]]:
    """Per conv/linear layer: weights, zeros and sparsity; a last row for the total."""
    rows: list[dict[str, float | int | str]] = []
    total = zeros = 0
    for name, layer in prunable_layers(model).items():
        n = layer.weight.numel()
        z = int((layer.weight.detach() == 0).sum())
        rows.append({"layer": name, "weights": n, "zeros": z, "sparsity": z / n})
        total, zeros = total + n, zeros + z
    rows.append({"layer": "(all conv/linear)", "weights": total, "zeros": zeros,
                 "sparsity": zeros / max(1, total)})
    return rows
