"""Calibration batches for static quantization, checked before any quantizer sees them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from netshrink.data.base import Split
from netshrink.errors import UserError

__all__ = ["calibration_batches"]


def calibration_batches(
    split: Split | None,
    *,
    input_shape: Sequence[int],
    images: int | None = None,
    batch_size: int = 32,
) -> list[np.ndarray]:
    """The first ``images`` images of ``split`` as float32 ``[N, C, H, W]`` numpy batches.

    Args:
        split: the calibration images (a recipe's ``calib`` split).
        input_shape: the model's image shape ``[C, H, W]``; the images must have it.
        images: how many to use; None for the whole split.
        batch_size: images per batch.

    Raises:
        UserError: the split is missing or empty, or its images have another shape.
    """
    if split is None or len(split) == 0:
        raise UserError("the calibration set is empty; set data.calib_size to a positive "
                        "number of images (512 is typical)")
    want = tuple(int(d) for d in input_shape)
    out: list[np.ndarray] = []
    left = len(split) if images is None else min(images, len(split))
    for x, _ in split.batches(batch_size):
        if tuple(x.shape[1:]) != want:
            raise UserError(f"calibration images have shape {list(x.shape[1:])} but the model "
                            f"takes {list(want)}; calibrate with images of the model's own "
                            "size and channels")
        take = x[:left].float().numpy()
        out.append(np.ascontiguousarray(take))
        left -= take.shape[0]
        if left <= 0:
            break
    return out
