"""What every dataset reader produces, and how batches come out of it.

Small datasets (Fashion-MNIST, CIFAR, digits) live in memory as one uint8 tensor, and
batches are cut, augmented and normalised as whole tensors: on a 2-core machine a
DataLoader with worker processes would take cores away from the model. Image folders are
decoded lazily from disk through a ``torch.utils.data.DataLoader``. Both satisfy ``Split``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from netshrink.data.bounds import check_batch

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a dataset that models, reports and ``predict`` need."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Augment:
    """Training augmentation for in-memory splits.

    Args:
        crop_padding: pad by this many pixels (reflect) and crop back at a random offset.
        hflip: flip half of the images left-right (wrong for digits, right for clothes).
    """

    crop_padding: int = 0
    hflip: bool = False


class Split(Protocol):
    """A split that yields normalised float batches ``(images NCHW, labels)``."""

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0
    ) -> Iterator[Batch]: ...


def shard_rows(n: int, rank: int, size: int) -> slice:
    """Rank ``rank`` of ``size``'s rows of a batch of ``n`` (data-parallel training):
    contiguous, the shares' sizes differ by at most one (the first ranks take the extra
    rows), together exactly the batch."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


@dataclass
class ArraySplit:
    """An in-memory split: uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``."""

    images: Tensor
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None = None
    augmentation: Augment = field(default_factory=Augment)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("ArraySplit.images must be a uint8 tensor [N, C, H, W]")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("ArraySplit.labels must have one label per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Tensor) -> ArraySplit:
        return ArraySplit(
            self.images[indices],
            self.labels[indices],
            self.mean,
            self.std,
            self.image_size,
            self.augmentation,
        )

    def to_float(self, images: Tensor) -> Tensor:
        """uint8 -> normalised float, resized to ``image_size`` when one is set."""
        x = images.float().div_(255.0)
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def _augment(self, x: Tensor, gen: torch.Generator, n: int | None = None,
                 rows: slice | None = None) -> Tensor:
        """Augment ``x``: the rows ``rows`` of a batch of ``n`` images (all of it by
        default). The random draws are made for the whole batch, so a rank's share of a
        batch is augmented exactly as in the whole batch one process gets."""
        aug = self.augmentation
        _, _, h, w = x.shape
        m = x.shape[0]
        n = m if n is None else n
        rows = slice(0, n) if rows is None else rows
        if aug.crop_padding > 0:
            p = aug.crop_padding
            padded = F.pad(x, (p, p, p, p), mode="reflect")
            # One random offset per image, gathered with index arithmetic: no Python loop.
            dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)[rows]
            dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)[rows]
            rows_i = (dy.view(m, 1) + torch.arange(h)).view(m, 1, h, 1)
            cols = (dx.view(m, 1) + torch.arange(w)).view(m, 1, 1, w)
            batch = torch.arange(m).view(m, 1, 1, 1)
            chan = torch.arange(x.shape[1]).view(1, -1, 1, 1)
            x = padded[batch, chan, rows_i, cols]
        if aug.hflip:
            flip = (torch.rand(n, generator=gen) < 0.5)[rows]
            x = torch.where(flip.view(m, 1, 1, 1), x.flip(-1), x)
        return x

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a batch size whose float batches would pass ``NETSHRINK_MAX_BATCH_BYTES``
        (the last wall: recipes and commands check their own batch sizes first).

        Raises:
            UserError: naming the batch size and the fix.
        """
        _, channels, h, w = self.images.shape
        check_batch("batch_size", batch_size, largest=len(self), channels=int(channels),
                    size=self.image_size or int(max(h, w)))

    def batches(
        self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0
    ) -> Iterator[Batch]:
        self.check_batch_size(batch_size)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=gen) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            x = self.to_float(self.images[idx])
            if augment:
                x = self._augment(x, gen)
            yield x, self.labels[idx]

    def shard_batches(
        self, batch_size: int, *, rank: int, size: int, shuffle: bool = False,
        augment: bool = False, seed: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor, int]]:
        """Rank ``rank`` of ``size``'s share of each batch ``batches`` yields (the same
        images, augmented the same way), with the whole batch's size: data-parallel
        training loads only its own share."""
        self.check_batch_size(-(-batch_size // size))  # this rank's share
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=gen) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            rows = shard_rows(len(idx), rank, size)
            x = self.to_float(self.images[idx[rows]])
            if augment:
                x = self._augment(x, gen, len(idx), rows)
            yield x, self.labels[idx[rows]], len(idx)


@dataclass
class DataBundle:
    """The splits a recipe works with.

    ``val`` is held out of ``train`` (for searches and early decisions); ``test`` is the
    dataset's own test set (for the figures we report); ``calib`` is a small deterministic
    subset of ``train`` for quantization calibration. ``fingerprint``: a hash of the
    content of data netshrink does not name itself (a factory's), for the stage keys.
    """

    info: DatasetInfo
    train: Split
    val: Split | None
    test: Split
    calib: Split
    fingerprint: str | None = None


@dataclass
class RawArrays:
    """What an in-memory reader returns: uint8 ``[N, C, H, W]`` images and int64 labels."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]
