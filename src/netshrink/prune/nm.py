"""N:M semi-structured sparsity (2:4) in the layout NVIDIA's sparse tensor cores use.

In every group of M consecutive input channels (for each output channel and, for a conv,
each kernel position) at most N weights are non-zero; we keep the N largest magnitudes.
That is the layout TensorRT and cuSPARSELt accept: for a conv weight [out, in, kh, kw]
the groups run along ``in``. On a CPU it saves nothing: the zeros are still multiplied.
"""

from __future__ import annotations

import copy

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from netshrink.errors import UserError
from netshrink.models.select import prunable_layers, select_layers
from netshrink.runtime.nm_layout import is_nm_sparse, nm_mask
from netshrink.train.masks import Masks, apply_masks


class NMPruneConfig(BaseModel):
    """The ``prune.nm`` stage.

    Attributes:
        n: keep ``n`` of every ``m`` consecutive input-channel weights (2:4 default).
        m: the size of those groups of weights.
        include: layer-name patterns. With no ``include``, every conv/linear layer whose
            input channels divide by ``m`` (a ResNet's first conv, on 1 or 3 channels, is
            skipped and the stage says so); an included layer that does not divide is an
            error.
        exclude: layer-name patterns of layers left dense.
    """

    model_config = ConfigDict(extra="forbid")

    n: int = Field(default=2, ge=1)
    m: int = Field(default=4, ge=2)
    include: list[str] | None = None
    exclude: list[str] | None = None

    @model_validator(mode="after")
    def _n_below_m(self) -> NMPruneConfig:
        if self.n >= self.m:
            raise ValueError(f"n must be below m for N:M sparsity, got {self.n}:{self.m}")
        return self


def prune_nm(model: nn.Module, cfg: NMPruneConfig) -> tuple[nn.Module, Masks, list[str]]:
    """N:M-prune a copy of ``model``.

    Returns:
        The pruned copy, the masks, and the names of layers skipped because their input
        channels do not divide by ``m`` (only when no ``include`` was given).

    Raises:
        UserError: an included layer's input channels are not a multiple of ``m``; a
            pattern matches nothing; nothing is left to prune.
    """
    pruned = copy.deepcopy(model)
    chosen = select_layers(pruned, include=cfg.include, exclude=cfg.exclude)
    skipped: list[str] = []
    if cfg.include is None:
        skipped = [name for name, layer in chosen.items() if layer.weight.shape[1] % cfg.m]
        chosen = {name: layer for name, layer in chosen.items() if name not in skipped}
        if not chosen:
            raise UserError(f"no conv/linear layer has input channels divisible by {cfg.m}")
    for name, layer in chosen.items():
        cin = layer.weight.shape[1]
        if cin % cfg.m:
            raise UserError(
                f"{cfg.n}:{cfg.m} sparsity needs input channels in multiples of {cfg.m}; "
                f"layer {name!r} has {cin}: exclude it"
            )
    masks = {name: nm_mask(layer.weight, cfg.n, cfg.m) for name, layer in chosen.items()}
    apply_masks(pruned, masks)
    assert all(is_nm_sparse(prunable_layers(pruned)[name].weight, cfg.n, cfg.m) for name in masks)
    return pruned.eval(), masks, skipped
