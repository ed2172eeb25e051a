"""A layer's shared weights (k-means weight sharing): what the packed format stores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Codebook"]


@dataclass
class Codebook:
    """One layer's shared weights.

    Attributes:
        centroids: float32 ``[K]``, none exactly zero, ``K <= 256`` (ascending as
            ``kmeans_share`` makes them; fine-tuning may reorder them, which is harmless).
        indices: uint8, shaped like the weight: the centroid of each non-zero weight.
            Entries where ``mask`` is False are 0 and mean nothing.
        mask: bool, shaped like the weight: True where the weight is non-zero. Kept apart
            from the indices so that all 256 index values of 8 bits name centroids.
    """

    centroids: Tensor
    indices: Tensor
    mask: Tensor

    @property
    def bits(self) -> int:
        """The fewest bits that index every centroid (at least 1)."""
        return max(1, (len(self.centroids) - 1).bit_length())

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight this codebook stands for: ``centroids[indices]`` where ``mask``, else 0.

        Computed in float32, then cast to ``dtype``: exactly what ``kmeans_share`` and
        ``CodebookHook`` write into the layer and what a packed file reloads.
        """
        if len(self.centroids) == 0:  # an all-zero layer
            return torch.zeros(self.indices.shape, dtype=dtype, device=self.indices.device)
        values = self.centroids.to(self.indices.device, torch.float32)[self.indices.long()]
        return torch.where(self.mask, values, torch.zeros((), dtype=values.dtype,
                                                          device=values.device)).to(dtype)
