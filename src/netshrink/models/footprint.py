"""What running a model will allocate, known before any of it is: its activations.

A model file bounds each of its facts on its own (the image size, the number of classes,
its tensors' shapes), yet together they can still ask for more memory than any machine
has: a 321 KB tiny ResNet whose metadata says 4,096-pixel images asks for 17 GB at
evaluation's batch of 256, and a channel-pruned file's widths come from its tensors. So
before a model runs on real data, it runs once on the ``meta`` device (shapes only,
nothing allocated, no arithmetic) and the activations it holds at once are tracked:
each op's new tensor counts from when it is made until the forward drops its last
reference, as it would be freed for real. That peak, the input included, times the
batch it will run at, must fit in ``max_activation_bytes()``.

The simulated peak is close to what a real pass adds to the process (ResNet-18 at 224
px, batch 32: 206 MB simulated, 209 MB measured; ResNet-101: 360 against 485, oneDNN's
scratch space being the rest), where a sum over every layer's output would be 4 to 15
times too high (43 GB for ResNet-101 at batch 256) and the largest single activation 2
to 5 times too low.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from netshrink.errors import UserError
from netshrink.limits import env_bound
from netshrink.models.modes import eval_mode, input_dtype

__all__ = ["MAX_ACTIVATION_ENV", "activation_problem", "check_activation",
           "check_training_memory", "device_memory", "input_bytes", "max_activation_bytes",
           "meta_forward", "training_bytes"]

MAX_ACTIVATION_ENV = "NETSHRINK_MAX_ACTIVATION_BYTES"
# ResNet-50 and -101 at 224 px hold 11.8 MB of activations an image at their peak (3.0
# GB at evaluation's batch of 256), so 8 GiB passes them at batches up to 725, and at
# 320 px at batch 256.
DEFAULT_MAX_ACTIVATION_BYTES = 8 << 30


def max_activation_bytes() -> int:
    """The activations a model may hold at once at the batch it runs with, in bytes:
    ``NETSHRINK_MAX_ACTIVATION_BYTES`` when set, else 8 GiB.

    Raises:
        UserError: the variable is set but is not a whole number of bytes above zero.
    """
    return env_bound(MAX_ACTIVATION_ENV, DEFAULT_MAX_ACTIVATION_BYTES, unit="bytes")


def activation_problem(per_image: int, batch: int) -> str | None:
    """Why running ``batch`` images that hold ``per_image`` bytes of activations each at
    once is too much, or None when it fits (the caller names the model in its error)."""
    limit = max_activation_bytes()
    total = per_image * batch
    if total <= limit:
        return None
    at = f" at batch {batch:,} ({per_image:,} bytes an image)" if batch != 1 else ""
    return (f"running it would hold {total:,} bytes of activations at once{at}, more than "
            f"the {limit:,} netshrink allows; use a smaller batch or input size, or raise "
            f"{MAX_ACTIVATION_ENV}")


def check_activation(per_image: int | None, batch: int, what: str) -> None:
    """Refuse to run ``what`` at ``batch`` when its activations would not fit (None:
    unknown, nothing to check).

    Raises:
        UserError: ``per_image * batch`` bytes is more than ``max_activation_bytes()``.
    """
    if per_image is None:
        return
    problem = activation_problem(per_image, batch)
    if problem:
        raise UserError(f"{what}: {problem}")


def input_bytes(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one image of ``shape`` (``[C, H, W]``) in ``dtype``, without overflow."""
    count = 1
    for d in shape:
        count *= int(d)
    return count * torch.empty((), dtype=dtype).element_size()


class _LivePeak(TorchDispatchMode):
    """Tracks the bytes of the tensors ops make that are still referenced, and their peak.

    A view or an in-place result shares memory counted when it was made, so only ops
    whose results alias nothing count; each such tensor is released by a finalizer when
    its last reference goes, as the real one would be freed.
    """

    def __init__(self, start: int) -> None:
        super().__init__()
        self.live = self.peak = start

    def _release(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, size)
        return out


def meta_forward(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Run ``model`` once on the ``meta`` device on one image of ``input_shape``: ``(the
    bytes of activations it holds at once, its input included, MACs)``.

    The peak is for one image; a CNN's activations all grow with the batch, so ``batch``
    images hold ``batch`` times as much (``check_activation``).

    The model's own tensors are not copied or touched: the forward sees meta stand-ins
    of its parameters and buffers (``torch.func.functional_call``), in eval mode and
    under ``no_grad``, so no activation is allocated and no statistic is updated. MACs
    are counted as ``counting.count_macs`` counts them (torch's FLOP counter, halved).

    Raises:
        Exception: whatever the forward raises on meta tensors: a missing meta kernel
            (``NotImplementedError``), layers whose shapes do not chain
            (``RuntimeError``), and so on; the caller decides what that means.
    """
    # The same model is sized several times on its way through a command (opened, its
    # MACs counted, checked at each batch it runs at): once per structure is enough.
    key = (_structure(model), tuple(int(d) for d in input_shape))
    known = _SIZED.setdefault(model, {})
    if key not in known:
        dtype = input_dtype(model)
        stand_ins = {name: torch.empty_like(t, device="meta") for name, t in
                     chain(model.named_parameters(), model.named_buffers())}
        x = torch.empty(1, *input_shape, dtype=dtype, device="meta")
        live = _LivePeak(x.numel() * x.element_size())
        counter = FlopCounterMode(display=False)
        with eval_mode(model), torch.no_grad(), counter, live:
            functional_call(model, stand_ins, (x,))
        known[key] = (live.peak, int(counter.get_total_flops()) // 2)
    return known[key]


# meta_forward's results by model object (forgotten with it) and structure: the names,
# shapes and types of its tensors, which change when a model is pruned in place.
_SIZED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[int, int]]] = (
    weakref.WeakKeyDictionary())


def _structure(model: nn.Module) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in
                 chain(model.named_parameters(), model.named_buffers()))


def training_bytes(model: nn.Module, input_shape: Sequence[int]) -> int:
    """The bytes one image's training step keeps alive at once: the activations the
    forward saves for the backward (in train mode, with gradients), its input included.
    Run on the ``meta`` device as ``meta_forward`` is: nothing allocated, nothing of the
    model's changed. (A ResNet-50 at 224 px: 87 MB an image, 22 GB at batch 256, about
    what a real step takes; in eval mode it holds 12 MB.)

    Raises:
        Exception: whatever the forward raises on meta tensors (see ``meta_forward``).
    """
    dtype = input_dtype(model)
    stand_ins = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
                 for name, t in chain(model.named_parameters(), model.named_buffers())}
    # Two images: batch norm in train mode refuses one image of 1x1 pixels per channel.
    x = torch.empty(2, *input_shape, dtype=dtype, device="meta")
    live = _LivePeak(x.numel() * x.element_size())
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), live:
            functional_call(model, stand_ins, (x,))
    finally:
        model.train(was_training)
    return live.peak // 2


def device_memory(device: str) -> int:
    """The memory of ``device`` in bytes: the GPU's, or this machine's RAM."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def check_training_memory(per_image: int, batch: int, where: str, device: str) -> None:
    """Refuse a training batch (of one process) whose activations alone would not fit:
    more than the device has (at least 8 GiB), or than ``NETSHRINK_MAX_ACTIVATION_BYTES``
    when set; found before the run writes anything rather than as an out-of-memory kill
    an epoch in.

    Raises:
        UserError: naming ``where``, the batch, the bytes and the fix.
    """
    if os.environ.get(MAX_ACTIVATION_ENV, "").strip():
        limit = max_activation_bytes()
        whose = f"{MAX_ACTIVATION_ENV}={limit:,} allows"
    else:
        memory = device_memory(device)
        limit = max(DEFAULT_MAX_ACTIVATION_BYTES, memory)
        whose = (f"this {device}'s memory holds" if memory >= DEFAULT_MAX_ACTIVATION_BYTES
                 else "netshrink allows (8 GiB)")
    total = per_image * batch
    if total > limit:
        raise UserError(
            f"{where}: training at batch {batch:,} would keep {total:,} bytes of activations "
            f"({per_image:,} an image), more than the {limit:,} {whose}; lower the batch "
            f"size or the image size, or set {MAX_ACTIVATION_ENV} to raise this bound")
