"""The N:M layout sparse tensor cores run (2:4 on NVIDIA GPUs): in every group of ``m``
consecutive input-channel weights of an output row (for a conv: at one kernel position),
at most ``n`` are non-zero. ``prune.nm`` prunes to it; the 2:4 kernels check it."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["is_nm_sparse", "nm_mask"]


def _grouped(weight: Tensor, m: int) -> Tensor:
    """View ``weight`` as rows of ``m`` consecutive input-channel weights."""
    if weight.ndim == 4:  # [out, in, kh, kw] -> [out, kh, kw, in]: input channels last
        weight = weight.permute(0, 2, 3, 1)
    return weight.reshape(-1, m)


def _ungrouped(groups: Tensor, like: Tensor) -> Tensor:
    if like.ndim == 4:
        out, cin, kh, kw = like.shape
        return groups.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)
    return groups.reshape(like.shape)


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` largest magnitudes in every group of ``m`` input channels."""
    groups = _grouped(weight.detach().abs(), m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return _ungrouped(keep, weight).contiguous()


def is_nm_sparse(weight: Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` input channels has at most ``n`` non-zeros."""
    if weight.shape[1] % m:
        return False
    return bool(((_grouped(weight.detach(), m) != 0).sum(dim=1) <= n).all())
