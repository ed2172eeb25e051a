"""Count what a model is made of: parameters, nonzero parameters, multiply-accumulates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from netshrink.errors import UserError
from netshrink.models.footprint import meta_forward
from netshrink.models.modes import eval_mode, input_dtype

__all__ = ["check_input_shape", "count_macs", "count_params", "eval_mode", "input_dtype"]


def check_input_shape(input_shape: Sequence[int]) -> list[int]:
    """Return ``input_shape`` as a list after checking it is one image ``[C, H, W]``.

    Raises:
        UserError: not three positive integers.
    """
    shape = list(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise UserError(
            f"input_shape must be one image [C, H, W] of positive ints, e.g. [3, 32, 32]; "
            f"got {input_shape!r}"
        )
    return shape


def count_params(model: nn.Module) -> tuple[int, int]:
    """Count a model's parameters, and those of them that are not zero.

    A parameter shared by several modules (tied weights) is counted once, as
    ``model.parameters()`` yields it once. Buffers (BatchNorm running statistics, masks)
    are not parameters and are not counted.

    A module pruned with ``torch.nn.utils.prune`` keeps the dense ``weight_orig``
    parameter and a ``weight_mask`` buffer; the weight the model computes with is their
    product, so the nonzero count is taken of ``weight_orig * weight_mask``. Counting
    ``weight_orig`` alone would report a pruned model as fully dense.

    Args:
        model: any module.

    Returns:
        ``(params, nonzero_params)``: element counts over all parameters.
    """
    buffers = dict(model.named_buffers())
    total = 0
    nonzero = 0
    # named_parameters() de-duplicates shared parameters by identity, like parameters().
    for name, param in model.named_parameters():
        total += param.numel()
        effective = param.detach()
        if name.endswith("_orig"):
            mask = buffers.get(name[: -len("_orig")] + "_mask")
            if mask is not None and mask.shape == param.shape:
                effective = effective * mask
        nonzero += int(torch.count_nonzero(effective))
    return total, nonzero


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Count the multiply-accumulates of one forward pass on one image.

    Uses torch's own FLOP counter (``torch.utils.flop_counter.FlopCounterMode``), which
    counts 2 FLOPs per multiply-accumulate in convolutions, matrix products and attention;
    elementwise ops, normalisation and pooling are not counted, the usual convention for
    CNN MAC figures (ResNet-18 at 224x224: 1.82 G). Ops without a registered formula,
    such as quantized kernels, count as zero.

    The model runs once in eval mode under ``no_grad`` on a batch of one image, on the
    ``meta`` device (shapes only: nothing is computed or allocated, so an input a file
    made huge costs nothing here; see ``models.footprint``); a model that cannot run
    there (an op without a meta kernel, a hook holding real tensors) runs on a zero
    image on the device and in the dtype of its parameters. Its modes are restored
    afterwards.

    Args:
        model: the model.
        input_shape: one image, ``[C, H, W]``.

    Returns:
        MACs for one image.

    Raises:
        UserError: ``input_shape`` is not three positive integers.
    """
    shape = check_input_shape(input_shape)
    try:
        return meta_forward(model, shape)[1]
    except Exception:  # the real run below counts it, or raises for real
        pass
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    x = torch.zeros(1, *shape, device=device, dtype=input_dtype(model))
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops()) // 2
