"""Unstructured L1-magnitude pruning: layer-wise or global, one-shot or iterative.

The requested sparsity is exact: a layer of n weights pruned at ratio r loses exactly
round(r * n) weights (layer-wise), and a global ranking removes exactly round(r * N) of
all N chosen weights. Ties are broken by position (a stable sort), never by dropping more.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from netshrink.models.select import select_layers
from netshrink.prune.resume import StepCheckpoints
from netshrink.train.masks import Masks, apply_masks, zero_masks

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

TrainFn = Callable[[nn.Module, Masks], None]


class MagnitudePruneConfig(BaseModel):
    """The ``prune.magnitude`` stage.

    Attributes:
        ratio: fraction of the chosen weights set to zero, in [0, 1).
        scope: ``layer`` (every layer loses ``ratio`` of its weights) or ``global`` (the
            smallest weights across all chosen layers go, wherever they are).
        include: layer-name patterns (``fc``, ``layer4.*``) of the layers pruned; all
            conv/linear layers by default.
        exclude: layer-name patterns of layers left whole.
        steps: 1 for one-shot; N > 1 prunes in N rising steps (``schedule``), fine-tuning
            ``finetune_epochs`` between steps through the one training loop.
        schedule: ``cubic`` (Zhu & Gupta: big steps first, gentle at the end) or ``linear``.
        finetune_epochs: the fine-tuning between iterative steps.
        finetune_lr: that fine-tuning's learning rate.
    """

    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(ge=0, lt=1)
    scope: Literal["layer", "global"] = "layer"
    include: list[str] | None = None
    exclude: list[str] | None = None
    steps: int = Field(default=1, ge=1)
    schedule: Literal["cubic", "linear"] = "cubic"
    finetune_epochs: int = Field(default=1, ge=0)
    finetune_lr: float = Field(default=0.01, gt=0)


def step_ratios(ratio: float, steps: int, schedule: str) -> list[float]:
    """The sparsity after each of ``steps`` steps, ending at ``ratio``."""
    fractions = [i / steps for i in range(1, steps + 1)]
    if schedule == "cubic":
        return [ratio * (1 - (1 - f) ** 3) for f in fractions]
    return [ratio * f for f in fractions]


def _smallest(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` smallest scores; ties broken by position, so exactly ``k``."""
    return torch.argsort(scores, stable=True)[:k]


@torch.no_grad()
def magnitude_masks(layers: dict[str, nn.Module], ratio: float, scope: str) -> Masks:
    """Masks that zero exactly ``ratio`` of the weights, per layer or globally.

    Weights already at zero score below every live weight, so an iterative schedule never
    revives what an earlier step pruned.
    """
    scores = {}
    for name, layer in layers.items():
        w = layer.weight.detach().abs().flatten().float()
        scores[name] = torch.where(w == 0, torch.full_like(w, -1.0), w)
    masks: Masks = {}
    if scope == "layer":
        for name, s in scores.items():
            keep = torch.ones_like(s, dtype=torch.bool)
            keep[_smallest(s, round(ratio * s.numel()))] = False
            masks[name] = keep.view_as(layers[name].weight)
        return masks
    flat = torch.cat(list(scores.values()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[_smallest(flat, round(ratio * flat.numel()))] = False
    offset = 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].view_as(layers[name].weight)
        offset += s.numel()
    return masks


def prune_magnitude(
    model: nn.Module, cfg: MagnitudePruneConfig, *, train_fn: TrainFn | None = None,
    steps: StepCheckpoints | None = None, log: Callable[[str], None] = LOG.info,
) -> tuple[nn.Module, Masks]:
    """Prune a copy of ``model`` by weight magnitude; the caller's model is not changed.

    Args:
        model: the model to prune.
        cfg: ratio, scope, layers and schedule.
        train_fn: ``(model, masks) -> None`` fine-tunes in place keeping ``masks``; called
            between iterative steps when ``cfg.finetune_epochs`` > 0.
        steps: where finished steps are kept: the pruning resumes after the last one kept.
        log: where the line saying so goes.

    Returns:
        The pruned copy (masks applied) and the final masks of the chosen layers.

    Raises:
        UserError: a layer pattern matches nothing, or no layer is left to prune.
    """
    pruned = copy.deepcopy(model)
    first = 0
    found = steps.latest() if steps is not None else None
    if found is not None:  # the weights after a finished step decide all that follows
        done, saved, _ = found
        pruned.load_state_dict(saved.state_dict())
        first = done + 1
        log(f"resuming after pruning step {first} of {cfg.steps}")
    layers = select_layers(pruned, include=cfg.include, exclude=cfg.exclude)
    masks: Masks = {}
    ratios = step_ratios(cfg.ratio, cfg.steps, cfg.schedule)
    for i, ratio in enumerate(ratios):
        if i < first:
            continue
        masks = magnitude_masks(layers, ratio, cfg.scope)
        apply_masks(pruned, masks)
        if i < len(ratios) - 1 and train_fn is not None and cfg.finetune_epochs > 0:
            if steps is not None:
                steps.current = i
            # Earlier pruning elsewhere (zeros outside the chosen layers) stays too.
            train_fn(pruned, {**zero_masks(pruned), **masks})
            if steps is not None:
                steps.save(pruned)
    return pruned.eval(), masks
