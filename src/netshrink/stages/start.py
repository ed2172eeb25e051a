"""The model a chain starts from: the recipe's ``model:`` section (or a distillation
stage's ``student:``), fresh and seeded or loaded from its weights.

The section names one of netshrink's architectures (``arch``), or the user's own model
by the function that builds it (``factory: package.module:function`` with ``kwargs``);
naming a factory in a recipe trusts it for that recipe's runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from netshrink.data import DataBundle
from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model, custom_spec, io_widths
from netshrink.models.factory import check_factory, check_factory_kwargs
from netshrink.store.checkpoint import load_model, stored_spec


class ModelSection(BaseModel):
    """The ``model:`` section. ``num_classes``/``in_channels`` default to the dataset's.

    ``factory`` (the user's model, ``package.module:function``) replaces ``arch``/``stem``:
    it is called with ``kwargs`` (plain values) and must give the data's classes.
    """

    model_config = ConfigDict(extra="forbid")

    arch: str = "resnet18"
    stem: Literal["imagenet", "cifar"] = "imagenet"
    num_classes: int | None = Field(default=None, gt=0)
    in_channels: int | None = Field(default=None, gt=0)
    zero_init_residual: bool = True
    weights: Path | None = None  # start from this checkpoint instead of a fresh init
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _import_path(cls, factory: str | None) -> str | None:
        if factory is not None:
            try:
                check_factory(factory, "model.factory")
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return factory

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if self.factory is None:
            if self.kwargs:
                raise ValueError("model.kwargs are the arguments of model.factory; name the "
                                 "factory (package.module:function) or leave kwargs out")
            return self
        # (a dumped and re-read section holds every default: only other values clash)
        both = [name for name in ("arch", "stem", "num_classes", "in_channels",
                                  "zero_init_residual")
                if getattr(self, name) != type(self).model_fields[name].default]
        if both:
            raise ValueError(f"model: {', '.join(both)} describe netshrink's own "
                             "architectures; with a factory, give its arguments in kwargs")
        try:
            check_factory_kwargs(self.kwargs, self.factory, "model.kwargs")
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return self


def section_spec(section: ModelSection, data: DataBundle) -> ModelSpec:
    """The spec a model section describes; classes and channels default to the data's."""
    if section.factory is not None:
        return ModelSpec(factory=section.factory, factory_kwargs=section.kwargs, pruned=True,
                         num_classes=data.info.num_classes, in_channels=data.info.in_channels)
    return ModelSpec(
        arch=section.arch,
        num_classes=section.num_classes or data.info.num_classes,
        in_channels=section.in_channels or data.info.in_channels,
        stem=section.stem,
        zero_init_residual=section.zero_init_residual,
    )


def section_of(spec: ModelSpec, weights: Path) -> dict[str, Any]:
    """The ``model:`` section that starts a recipe from the file ``weights`` of ``spec``
    (a command or a search on a model file runs as a recipe)."""
    if spec.factory is not None:
        return {"factory": spec.factory, "weights": str(weights)}
    return {"arch": spec.arch, "stem": spec.stem, "weights": str(weights)}


def start_model(section: ModelSection, data: DataBundle, *, seed: int
                ) -> tuple[nn.Module, ModelSpec]:
    """A fresh model initialised from ``seed``, or ``section.weights`` loaded into the
    section's structure (a channel- or depth-pruned file keeps its own widths and blocks;
    a file of the user's model, its own factory and arguments).

    Raises:
        UserError: the weights file is missing, unreadable or does not fit the section;
            the user's model does not give the data's classes.
    """
    spec = section_spec(section, data)
    if section.weights is None:
        torch.manual_seed(seed)
        model = build_model(spec, where="model.factory")
        if spec.factory is not None:
            spec = custom_spec(model, spec.factory, spec.factory_kwargs)
            model.netshrink_spec = spec
    else:
        stored = stored_spec(section.weights)
        if stored is not None and stored.factory is not None:
            if section.factory not in (None, stored.factory):
                raise UserError(f"model.weights {section.weights}: built by {stored.factory}, "
                                f"not model.factory {section.factory}; name the factory the "
                                "file was saved with, or leave model.factory out")
            spec = stored  # its own factory, arguments and structure
        elif stored is not None:
            # the file's own structure: channel widths (pruned), blocks kept (depth-pruned)
            spec = spec.model_copy(update={"pruned": stored.pruned, "blocks": stored.blocks,
                                           "removed": stored.removed})
        model, spec, _ = load_model(section.weights, spec=spec)
    _check_classes(model, spec, data)
    return model, spec


def _check_classes(model: nn.Module, spec: ModelSpec, data: DataBundle) -> None:
    """The user's model must give one output per class of the data.

    Raises:
        UserError: it gives another number.
    """
    outputs = io_widths(model)[1]
    classes = data.info.num_classes
    if spec.factory is not None and outputs is not None and outputs != classes:
        raise UserError(f"model {spec.factory} ends in {outputs} outputs but the data has "
                        f"{classes} classes; build it with {classes} outputs (model.kwargs)")
