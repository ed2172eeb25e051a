"""Calibration batches as ONNX Runtime's static quantizer reads them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from netshrink.export.onnx import ONNX_INPUT

__all__ = ["CalibrationReader"]


class CalibrationReader:
    """ONNX Runtime's calibration reader over a list of numpy batches."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self._batches = list(batches)
        self._next = 0

        self._end = len(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        self._next += 1
        return {ONNX_INPUT: self._batches[self._next - 1]}
