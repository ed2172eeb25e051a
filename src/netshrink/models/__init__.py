"""Model factories behind one registry, and the spec that rebuilds a model from data.

A checkpoint stores a ``ModelSpec`` (JSON) next to its weights (safetensors), never a
pickled module: the spec names a registered factory and its arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from netshrink.models.resnet import ARCHITECTURES, BasicBlock, ResNet, keep_blocks
from netshrink.registry import Registry

__all__ = ["MODELS", "ModelSpec", "build_model", "randomized_model"]

Factory = Callable[..., nn.Module]
MODELS: Registry[Factory] = Registry("model")


class ModelSpec(BaseModel):
    """Everything needed to rebuild a model's structure.

    Args:
        arch: a registered model name (``netshrink list models``).
        num_classes: outputs of the classifier.
        in_channels: input channels (1 for grayscale).
        stem: ``imagenet`` (7x7/2 conv + max-pool) or ``cifar`` (3x3/1 conv, no pool).
        zero_init_residual: start each residual branch's last BN at zero.
        pruned: channels were removed: conv/BN/linear shapes come from the weights file.
        blocks: residual blocks kept per stage, from each stage's first (a depth-pruned
            ResNet, ``prune.blocks``); None: the architecture's own.
    """

    model_config = ConfigDict(extra="forbid")

    arch: str = "resnet18"
    num_classes: int = Field(default=1000, gt=0)
    in_channels: int = Field(default=3, gt=0)
    stem: Literal["imagenet", "cifar"] = "imagenet"
    zero_init_residual: bool = False
    pruned: bool = False
    blocks: list[int] | None = None


def build_model(spec: ModelSpec) -> nn.Module:
    """Build a freshly initialised model from ``spec``.

    A ``pruned`` spec builds the unpruned architecture; ``load_model`` then resizes its
    layers to the weights file's shapes (``netshrink.models.resize.resize_to_state``).

    Raises:
        UserError: the architecture is not registered.
    """
    factory = MODELS.get(spec.arch)
    model = factory(
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        stem=spec.stem,
        zero_init_residual=spec.zero_init_residual,
    )
    if spec.blocks is not None:
        keep_blocks(model, spec.blocks)
    # The spec travels with the module, so the Python API can save what it was given
    # (``netshrink.prune(model, ...)`` on a model this built) without being told.
    model.netshrink_spec = spec
    return model


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
