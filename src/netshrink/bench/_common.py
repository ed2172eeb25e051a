"""Small helpers the measuring modules share: device checks and a temporary eval mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from netshrink.errors import UserError

# The float dtypes a model's inputs can be cast to, and the name a report shows for each.
PRECISIONS: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"`` or ``"cuda:1"`` into a device this machine has.

    Raises:
        UserError: the device type is not cpu/cuda, or CUDA was asked for and is missing.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported for measuring; use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return dev


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
