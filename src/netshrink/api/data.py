"""The user's data as netshrink's splits: a ``DataLoader``, or any iterable of image
tensors or ``(images, labels)`` batches, becomes a ``Split`` the training loop, the
calibration and the evaluation read; a few of them become a ``DataBundle``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from netshrink.data import Batch, DataBundle, DatasetInfo, Split
from netshrink.errors import UserError
from netshrink.limits import clip

__all__ = ["Data", "IterableSplit", "as_split", "batch_size_of", "bundle", "first_images"]

Data = Split | Iterable[Any]  # a netshrink split, a DataLoader, or any iterable of batches


def _batch(item: Any, where: str) -> Batch:
    """``(images, labels)`` of one item: a tensor of images (labels unknown: -1), or a
    pair/list whose first two entries are images and labels."""
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

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                seed: int = 0) -> Iterator[Batch]:
        for i, item in enumerate(self.source):
            yield _batch(item, f"{self.name}, batch {i}")


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


def _classes(model: nn.Module, image: Tensor) -> int:
    """The width of ``model``'s output on one image of the data: its class count.

    Raises:
        UserError: the model does not run on the data's images, or returns no tensor.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    try:
        with torch.inference_mode():
            out = model(image.to(param.device if param is not None else "cpu"))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"{type(model).__name__} does not run on the data's images "
                        f"({list(image.shape)}: {type(exc).__name__}: {clip(str(exc), 160)}); "
                        "give batches the model takes") from None
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor):
        raise UserError(f"{type(model).__name__} returns a {type(out).__name__}, not one "
                        "tensor of logits: netshrink takes a model whose forward returns "
                        "them (wrap it in a module that picks them)")
    return int(out.shape[-1])


def bundle(model: nn.Module, *, train: Data | None = None, val: Data | None = None,
           test: Data | None = None, calib: Data | None = None,
           class_names: list[str] | None = None) -> DataBundle:
    """A ``DataBundle`` of the user's splits; facts about the data come from its first
    batch (channels, side) and the model (classes: the width of its output).

    Raises:
        UserError: no split given, non-square images, or batches that are not images.
    """
    splits = {k: as_split(v, k) for k, v in
              {"train": train, "val": val, "test": test, "calib": calib}.items()}
    given = [s for s in splits.values() if s is not None]
    if not given:
        raise UserError("give some data: train=, val=, test= or calib= (a DataLoader)")
    images = first_images(given[0])
    channels, height, width = images.shape[1:]
    if height != width:
        raise UserError(f"images are {height}x{width}; netshrink's training and measuring "
                        "take square images: resize or crop them in your DataLoader")
    classes = _classes(model, images[:1])
    info = DatasetInfo(name="custom", num_classes=classes, in_channels=int(channels),
                       image_size=int(height),
                       class_names=class_names or [str(i) for i in range(classes)],
                       mean=(0.0,) * int(channels), std=(1.0,) * int(channels))
    first = given[0]
    return DataBundle(info=info, train=splits["train"] or first, val=splits["val"],
                      test=splits["test"] or splits["val"] or first,
                      calib=splits["calib"] or splits["train"] or first)
