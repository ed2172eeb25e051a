"""Small helpers the measuring modules share: device checks and a temporary eval mode."""

from __future__ import annotations

import torch

from netshrink.errors import UserError
from netshrink.models.counting import eval_mode, input_dtype

__all__ = ["PRECISIONS", "eval_mode", "input_dtype", "resolve_device"]

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
