"""Model factories behind one registry, and the spec that rebuilds a model from data.

A checkpoint stores a ``ModelSpec`` (JSON) next to its weights (safetensors), never a
pickled module: the spec names a registered architecture, or the user's own factory
(``package.module:function``, called only when trusted: ``netshrink.models.factory``),
and its arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from netshrink.errors import UserError
from netshrink.models.factory import FACTORY_PATTERN, call_factory, trusted_arguments
from netshrink.models.resnet import ARCHITECTURES, BasicBlock, ResNet, keep_blocks
from netshrink.registry import Registry

__all__ = ["MODELS", "ModelSpec", "build_model", "custom_spec", "io_widths",
           "randomized_model"]

Factory = Callable[..., nn.Module]
MODELS: Registry[Factory] = Registry("model")


class ModelSpec(BaseModel):
    """Everything needed to rebuild a model's structure.

    Attributes:
        arch: a registered model name (``netshrink list models``); for the user's own
            model, its factory's name.
        factory: the user's own model: ``package.module:function`` that builds it, called
            (only when trusted) with ``factory_kwargs``; ``num_classes``, ``in_channels``
            and ``stem`` then only describe what it builds.
        num_classes: outputs of the classifier.
        in_channels: input channels (1 for grayscale).
        stem: ``imagenet`` (7x7/2 conv + max-pool) or ``cifar`` (3x3/1 conv, no pool).
        zero_init_residual: start each residual branch's last BN at zero.
        pruned: channels were removed: conv/BN/linear shapes come from the weights file.
        blocks: residual blocks kept per stage, from each stage's first (a depth-pruned
            ResNet, ``prune.blocks``); None: the architecture's own.
        removed: submodules replaced by an identity (residual blocks of any model removed
            by depth pruning), by their names in the model.
    """

    model_config = ConfigDict(extra="forbid")

    arch: str = "resnet18"
    num_classes: int = Field(default=1000, gt=0)
    in_channels: int = Field(default=3, gt=0)
    stem: Literal["imagenet", "cifar"] = "imagenet"
    zero_init_residual: bool = False
    pruned: bool = False
    blocks: list[int] | None = None
    factory: str | None = Field(default=None, max_length=200)
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    removed: list[str] = Field(default_factory=list, max_length=4096)

    @model_validator(mode="before")
    @classmethod
    def _arch_of_factory(cls, data: Any) -> Any:
        # The user's model is named by its factory wherever a spec is shown.
        if isinstance(data, dict) and data.get("factory") and "arch" not in data:
            data = {**data, "arch": data["factory"]}
        return data

    @field_validator("factory")
    @classmethod
    def _import_path(cls, factory: str | None) -> str | None:
        if factory is not None and not FACTORY_PATTERN.fullmatch(factory):
            raise ValueError(f"{factory[:80]!r} is not an import path; give "
                             "'package.module:function'")
        return factory

    @field_validator("removed")
    @classmethod
    def _module_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name or len(name) > 300 or not all(p.isidentifier() or p.isdigit()
                                                      for p in name.split(".")):
                raise ValueError(f"removed: {name[:80]!r} is not a submodule name")
        return names


def build_model(spec: ModelSpec, *, where: str = "model") -> nn.Module:
    """Build a freshly initialised model from ``spec``.

    A ``pruned`` spec builds the unpruned architecture; ``load_model`` then resizes its
    layers to the weights file's shapes (``netshrink.models.resize.resize_to_state``).

    A spec with a ``factory`` calls it (only if trusted: ``models.factory.trusting``)
    with the trust's arguments, else the spec's ``factory_kwargs``.

    Args:
        where: names the model in messages (its file).

    Raises:
        UserError: the architecture is not registered, the factory is not trusted or
            fails, or a removed submodule is not in the model.
    """
    if spec.factory is not None:
        kwargs = trusted_arguments(spec.factory, where)
        if kwargs is not None:  # the caller's arguments: what the model is built with
            spec = spec.model_copy(update={"factory_kwargs": kwargs})
        model = call_factory(spec.factory, spec.factory_kwargs, where)
    else:
        model = MODELS.get(spec.arch)(
            num_classes=spec.num_classes,
            in_channels=spec.in_channels,
            stem=spec.stem,
            zero_init_residual=spec.zero_init_residual,
        )
    if spec.blocks is not None:
        keep_blocks(model, spec.blocks)
    for name in spec.removed:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{where}: the model has no submodule {name!r} to remove; the "
                            "file was written for another version of the model") from None
        model.set_submodule(name, nn.Identity())
    if spec.removed:
        model.netshrink_removed = list(spec.removed)
    # The spec travels with the module, so the Python API can save what it was given
    # (``netshrink.prune(model, ...)`` on a model this built) without being told.
    model.netshrink_spec = spec
    return model


def io_widths(model: nn.Module) -> tuple[int | None, int | None]:
    """The first conv's input channels and the last linear layer's outputs."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return (convs[0].in_channels if convs else None,
            linears[-1].out_features if linears else None)


def custom_spec(model: nn.Module, factory: str, factory_kwargs: dict[str, Any] | None = None,
                ) -> ModelSpec:
    """The spec of the user's own ``model``, built by ``factory(**factory_kwargs)``: its
    layers' widths come from the weights file (``pruned``), so a channel-pruned model
    rebuilds too, and so does one depth pruning left identities in; the input channels
    and classes are what it has now."""
    channels, classes = io_widths(model)
    removed = getattr(model, "netshrink_removed", [])  # depth pruning's identities
    return ModelSpec(factory=factory, factory_kwargs=dict(factory_kwargs or {}), pruned=True,
                     in_channels=channels or 3, num_classes=classes or 1,
                     removed=list(removed))


def _resnet_factory(block, layers) -> Factory:
    def make(**kwargs: object) -> nn.Module:
        return ResNet(block, layers, **kwargs)  # type: ignore[arg-type]

    return make


for _name, (_block, _layers) in ARCHITECTURES.items():
    MODELS.register(_name)(_resnet_factory(_block, _layers))

# A tiny ResNet with every code path of the real ones (stem, residual adds, downsample
# shortcuts, fc) that runs in milliseconds: the model tests use.
MODELS.register("resnet_tiny")(
    lambda **kw: ResNet(BasicBlock, [1, 1, 1, 1], widths=(8, 16, 32, 64), **kw)  # type: ignore[arg-type]
)


def randomized_model(spec: ModelSpec, *, seed: int = 0) -> nn.Module:
    """A model in eval mode with seeded random weights and random BatchNorm statistics.

    A fresh model's BN layers are identities (mean 0, var 1, scale 1), which hides bugs in
    BN folding, reloading and quantization; benchmarks and tests use this instead.
    """
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.3, 1.2)
    return model
