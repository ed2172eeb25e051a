"""Top-1 / top-5 accuracy and mean cross-entropy of a classifier on a split."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.functional import cross_entropy

from netshrink.bench._common import eval_mode, input_dtype, resolve_device
from netshrink.bench.schema import MAX_HITS_IMAGES, Accuracy, pack_hits
from netshrink.data.base import Split
from netshrink.errors import UserError

__all__ = ["evaluate"]


def evaluate(
    model: nn.Module,
    split: Split,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    split_name: str = "test",
) -> Accuracy:
    """Evaluate a classifier: top-1, top-5 and mean cross-entropy loss.

    Batches come in the split's own order (no shuffling, no augmentation), so
    ``max_images`` always picks the same images. Top-5 is top-``min(5, classes)``: with
    fewer than five classes it is 1.0, as every label is among the top "five". The model
    runs in eval mode under ``torch.inference_mode``; its modes are restored afterwards.
    It is not moved: ``device`` must be where it lives; batches are moved there and cast
    to the dtype of its parameters.

    Args:
        model: a module returning logits ``[N, classes]``.
        split: the images and labels.
        batch_size: images per forward pass.
        device: where ``model`` lives.
        max_images: evaluate only the first this many images; None for all.
        split_name: the name recorded, e.g. ``"test"`` or ``"val"``.

    Returns:
        An ``Accuracy`` with fractions in [0, 1], the mean loss per image and, up to
        ``MAX_HITS_IMAGES`` images, which images top-1 got right (``correct``), in the
        split's order.

    Raises:
        UserError: ``batch_size`` or ``max_images`` is below 1, the split is empty, or
            the model's output is not ``[N, classes]`` logits.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    if max_images is not None and max_images < 1:
        raise UserError(f"max_images must be at least 1 (or None for all), not {max_images}")
    dev = resolve_device(device)
    dtype = input_dtype(model)

    images = 0
    correct1 = 0
    correct5 = 0
    loss_sum = 0.0
    hits1: list[torch.Tensor] = []  # per batch; dropped once past MAX_HITS_IMAGES
    with eval_mode(model), torch.inference_mode():
        for x, y in split.batches(batch_size, shuffle=False, augment=False):
            if max_images is not None:
                if images >= max_images:
                    break
                x, y = x[: max_images - images], y[: max_images - images]
            x = x.to(dev, dtype=dtype, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            logits = model(x)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                raise UserError(
                    "evaluate needs a classifier returning logits [N, classes]; got "
                    f"{type(logits).__name__} {getattr(logits, 'shape', '')}"
                )
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hits = top.eq(y.view(-1, 1))
            correct1 += int(hits[:, 0].sum())
            if images + int(y.shape[0]) <= MAX_HITS_IMAGES:
                hits1.append(hits[:, 0].cpu())
            else:
                hits1.clear()
            correct5 += int(hits.any(dim=1).sum())
            # Loss in float32 whatever the model's precision: fp16 sums overflow.
            loss_sum += float(cross_entropy(logits.float(), y, reduction="sum"))
            images += int(y.shape[0])
    if images == 0:
        raise UserError(f"split {split_name!r} has no images to evaluate")
    return Accuracy(
        split=split_name,
        images=images,
        top1=correct1 / images,
        top5=correct5 / images,
        loss=loss_sum / images,
        correct=pack_hits(torch.cat(hits1).numpy()) if images <= MAX_HITS_IMAGES else None,
    )
