"""How a model is run for counting and measuring: its input type, eval mode for a while."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["eval_mode", "input_dtype"]


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's inputs must have: that of its first floating parameter.

    A model with no floating parameters (parameter-free, or quantized with packed weights)
    takes float32 inputs.
    """
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then give every submodule its old mode back.

    ``model.train(old)`` alone would not do: it sets one flag on every submodule, and a
    caller may have frozen some (e.g. BatchNorm kept in eval while the rest trains).
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
