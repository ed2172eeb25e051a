"""The model a chain starts from: the recipe's ``model:`` section (or a distillation
stage's ``student:``), fresh and seeded or loaded from its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from netshrink.data import DataBundle
from netshrink.models import ModelSpec, build_model
from netshrink.store.checkpoint import load_model, stored_spec


class ModelSection(BaseModel):
    """The ``model:`` section. ``num_classes``/``in_channels`` default to the dataset's."""

    model_config = ConfigDict(extra="forbid")

    arch: str = "resnet18"
    stem: Literal["imagenet", "cifar"] = "imagenet"
    num_classes: int | None = Field(default=None, gt=0)
    in_channels: int | None = Field(default=None, gt=0)
    zero_init_residual: bool = True
    weights: Path | None = None  # start from this checkpoint instead of a fresh init


def section_spec(section: ModelSection, data: DataBundle) -> ModelSpec:
    """The spec a model section describes; classes and channels default to the data's."""
    return ModelSpec(
        arch=section.arch,
        num_classes=section.num_classes or data.info.num_classes,
        in_channels=section.in_channels or data.info.in_channels,
        stem=section.stem,
        zero_init_residual=section.zero_init_residual,
    )


def start_model(section: ModelSection, data: DataBundle, *, seed: int
                ) -> tuple[nn.Module, ModelSpec]:
    """A fresh model initialised from ``seed``, or ``section.weights`` loaded into the
    section's structure (a channel- or depth-pruned file keeps its own widths and blocks).

    Raises:
        UserError: the weights file is missing, unreadable or does not fit the section.
    """
    spec = section_spec(section, data)
    if section.weights is None:
        torch.manual_seed(seed)
        return build_model(spec), spec
    stored = stored_spec(section.weights)
    if stored is not None:
        # the file's own structure: channel widths (pruned) and blocks kept (depth-pruned)
        spec = spec.model_copy(update={"pruned": stored.pruned, "blocks": stored.blocks})
    model, spec, _ = load_model(section.weights, spec=spec)
    return model, spec
