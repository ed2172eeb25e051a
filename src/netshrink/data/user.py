"""The user's batches as netshrink's splits: a ``DataLoader``, or any iterable of image
tensors or ``(images, labels)`` batches, becomes a ``Split`` the training loop, the
calibration and the evaluation read (the Python verbs' data); and the facts of such
data (``DatasetInfo``) from its first images.

A data factory's torch ``Dataset``s are batched by ``netshrink.data.factory``; both
check each batch with ``check_batch`` here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from netshrink.data.base import Batch, DatasetInfo, Split
from netshrink.errors import UserError

__all__ = ["Data", "IterableSplit", "as_split", "batch_size_of", "check_batch",
           "first_images", "image_info"]

Data = Split | Iterable[Any]  # a netshrink split, a DataLoader, or any iterable of batches


def check_batch(item: Any, where: str) -> Batch:
    """``(images, labels)`` of one item: a tensor of images (labels unknown: -1), or a
    pair/list whose first two entries are images and labels.

    Raises:
        UserError: not a batch of float images ``[N, C, H, W]`` with one label each.
    """
    if isinstance(item, Tensor):
        images, labels = item, torch.full((len(item),), -1, dtype=torch.long)
    elif isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], Tensor):
        images, labels = item[0], torch.as_tensor(item[1])
    else:
        raise UserError(f"{where}: a batch must be an image tensor [N, C, H, W] or a pair "
                        f"(images, labels); got {type(item).__name__}")
    if images.ndim != 4 or not images.is_floating_point():
        raise UserError(f"{where}: images must be a float tensor [N, C, H, W] (normalised as "
                        f"the model expects); got {tuple(images.shape)} {images.dtype}")
    if labels.shape != (len(images),):
        raise UserError(f"{where}: {len(images)} images but labels of shape "
                        f"{tuple(labels.shape)}; give one class index per image")
    return images, labels.long()


class IterableSplit:
    """A ``Split`` over the user's iterable (a ``DataLoader``: it decides batch size,
    order and augmentation, so ``batches``' own options are ignored)."""

    def __init__(self, source: Iterable[Any], name: str = "data") -> None:
        if isinstance(source, (Tensor, str, bytes)) or not isinstance(source, Iterable):
            raise UserError(f"{name}: give a DataLoader or an iterable of batches, not "
                            f"{type(source).__name__}")
        self.source, self.name = source, name
        self._len: int | None = None

    def __len__(self) -> int:
        if self._len is None:
            dataset = getattr(self.source, "dataset", None)
            try:
                self._len = len(dataset)  # type: ignore[arg-type]
            except TypeError:  # no dataset (a plain iterable): count once
                self._len = sum(len(x) for x, _ in self.batches(0))
        return self._len

    @property
    def own_batch_size(self) -> int | None:
        """The batch size the loader gives (``train.config.fit_batch_size``)."""
        return batch_size_of(self)

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                seed: int = 0) -> Iterator[Batch]:
        for i, item in enumerate(self.source):
            yield check_batch(item, f"{self.name}, batch {i}")


def as_split(data: Data | None, name: str = "data") -> Split | None:
    """``data`` as a ``Split`` (netshrink's own splits pass through)."""
    if data is None or hasattr(data, "batches"):
        return data  # type: ignore[return-value]
    return IterableSplit(data, name)


def batch_size_of(split: Split) -> int | None:
    """The batch size the user's loader gives (None for netshrink's own splits, which
    batch as asked): the training loop counts its steps per epoch with it."""
    if not isinstance(split, IterableSplit):
        return None
    size = getattr(split.source, "batch_size", None)
    if isinstance(size, int) and size > 0:
        return size
    return len(first_images(split))


def first_images(split: Split) -> Tensor:
    """The first batch's images: the input shape a model is traced and measured with."""
    for images, _ in split.batches(1):
        return images
    raise UserError("the data gives no batches; give at least one batch of images")


def image_info(shape: tuple[int, ...] | torch.Size, *, name: str, num_classes: int,
               class_names: list[str] | None = None,
               mean: tuple[float, ...] | None = None,
               std: tuple[float, ...] | None = None) -> DatasetInfo:
    """The facts of the user's data from one image's ``[C, H, W]``: its images come
    normalised as the model expects (mean 0, std 1 unless told otherwise).

    Raises:
        UserError: the images are not square.
    """
    channels, height, width = (int(d) for d in shape[-3:])
    if height != width:
        raise UserError(f"images are {height}x{width}; netshrink's training and measuring "
                        "take square images: resize or crop them in your data")
    return DatasetInfo(name=name, num_classes=num_classes, in_channels=channels,
                       image_size=height,
                       class_names=class_names or [str(i) for i in range(num_classes)],
                       mean=mean or (0.0,) * channels, std=std or (1.0,) * channels)
