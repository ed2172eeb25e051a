"""A ``Split`` over a map-style torch ``Dataset`` (a data factory's, or the dataset of a
``DataLoader`` given to ``netshrink.compress``): items ``(image tensor [C, H, W], class
index)`` batched as each caller asks (batch size, seeded order), so validation and
calibration images can be held out by index and every stage batches as its config says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from netshrink.data.base import Batch
from netshrink.data.user import check_batch
from netshrink.errors import UserError
from netshrink.limits import clip

__all__ = ["DatasetSplit", "check_item", "dataset_split"]


@dataclass(frozen=True)
class _Unstackable:
    """A batch whose items would not stack, passed back from a loader worker as data (an
    exception raised there reaches the caller with the worker's traceback folded in)."""

    message: str


class _Collate:
    """The loader's ``collate_fn``, its refusal passed back as data (a class, not a
    closure: a loader's worker processes may be spawned and take it pickled)."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> Any:
        try:
            return self.collate(items)
        except (RuntimeError, TypeError, ValueError) as exc:
            return _Unstackable(clip(" ".join(str(exc).split()), 160))


class DatasetSplit:
    """A ``Split`` over a map-style torch ``Dataset`` of ``(image, label)`` items, batched
    as asked (size, seeded order), optionally a subset of its indices."""

    def __init__(self, dataset: Dataset, name: str, *, indices: Tensor | None = None,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 num_workers: int = 0) -> None:
        self.dataset, self.name, self.indices = dataset, name, indices
        self.collate_fn = collate_fn or default_collate
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)  # type: ignore[arg-type]

    def _index(self, i: int) -> int:
        return int(self.indices[i]) if self.indices is not None else i

    def item(self, i: int) -> Any:
        """The ``i``-th item of this split, as the dataset gives it."""
        return self.dataset[self._index(i)]

    def subset(self, indices: Tensor) -> DatasetSplit:
        chosen = self.indices[indices] if self.indices is not None else indices
        return DatasetSplit(self.dataset, self.name, indices=chosen,
                            collate_fn=self.collate_fn, num_workers=self.num_workers)

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                seed: int = 0) -> Iterator[Batch]:
        # ``augment`` is the dataset's own business: its transforms run as written
        gen = torch.Generator().manual_seed(seed)
        n = len(self)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        if self.indices is not None:
            order = self.indices[order]
        loader = DataLoader(self.dataset, batch_size=max(1, batch_size),
                            sampler=order.tolist(), num_workers=self.num_workers,
                            collate_fn=_Collate(self.collate_fn), generator=gen)
        for i, batch in enumerate(loader):
            where = f"{self.name}, batch {i}"
            if isinstance(batch, _Unstackable):
                raise UserError(f"{where}: its items do not stack into a batch "
                                f"({batch.message}); every image must have the same shape")
            yield check_batch(batch, where)


def dataset_split(value: Any, where: str) -> DatasetSplit:
    """``value`` (a Dataset, or a DataLoader over one) as a ``DatasetSplit``.

    Raises:
        UserError: another kind of value, or a loader over an iterable-style dataset.
    """
    collate, workers = None, 0
    if isinstance(value, DataLoader):
        collate, workers, value = value.collate_fn, value.num_workers, value.dataset
        where = f"{where} (a DataLoader's dataset)"
    if isinstance(value, IterableDataset) or not (
            hasattr(value, "__getitem__") and hasattr(value, "__len__")):
        raise UserError(f"{where}: a {type(value).__name__}; give a map-style torch Dataset "
                        "(len and indexing) or a DataLoader over one: netshrink holds "
                        "validation images out by index, shuffles with a seed and "
                        "fingerprints the data")
    split = DatasetSplit(value, where, collate_fn=collate, num_workers=workers)
    if len(split) == 0:
        raise UserError(f"{where}: no items; give at least one image")
    check_item(split.item(0), f"{where}, item 0")
    return split


def check_item(item: Any, where: str) -> None:
    """One item is ``(image tensor [C, H, W] float, class index)``."""
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        hint = "; add a ToTensor transform" if type(item).__name__ == "Image" else ""
        raise UserError(f"{where}: a {type(item).__name__}, expected a pair (image tensor "
                        f"[C, H, W], class index){hint}")
    image, label = item[0], item[1]
    if not isinstance(image, Tensor):
        hint = "; add a ToTensor transform" if type(image).__name__ == "Image" else ""
        raise UserError(f"{where}: the image is a {type(image).__name__}, expected a float "
                        f"tensor [C, H, W]{hint}")
    if image.ndim != 3 or not image.is_floating_point():
        raise UserError(f"{where}: the image is a {image.dtype} tensor of shape "
                        f"{tuple(image.shape)}, expected a float tensor [C, H, W] "
                        "(normalised as the model expects)")
    whole = isinstance(label, (int, np.integer)) and not isinstance(label, bool)
    if isinstance(label, Tensor):
        whole = label.numel() == 1 and not label.is_floating_point()
    if not whole:
        raise UserError(f"{where}: the label is {clip(repr(label), 60)}, expected a class "
                        "index (a whole number)")
