"""The user's data as netshrink's splits (``netshrink.data.user``): a ``DataLoader``, or
any iterable of image tensors or ``(images, labels)`` batches, becomes a ``Split``; a few
of them, with the model that reads them, become a ``DataBundle``."""

from __future__ import annotations

import torch
from torch import nn

from netshrink.data import DataBundle
from netshrink.data.user import (
    Data,
    IterableSplit,
    as_split,
    batch_size_of,
    first_images,
    image_info,
)
from netshrink.errors import UserError
from netshrink.limits import clip

__all__ = ["Data", "IterableSplit", "as_split", "batch_size_of", "bundle", "first_images",
           "model_classes"]


def model_classes(model: nn.Module, images: torch.Tensor) -> int:
    """The width of ``model``'s output on one of ``images``: its number of classes.

    Raises:
        UserError: the model does not run on the data's images, or returns no tensor.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    try:
        with torch.inference_mode():
            out = model(images[:1].to(param.device if param is not None else "cpu"))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"{type(model).__name__} does not run on the data's images "
                        f"({list(images.shape[1:])}: {type(exc).__name__}: "
                        f"{clip(str(exc), 160)}); give batches the model takes") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
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
    info = image_info(images.shape, name="custom", num_classes=model_classes(model, images),
                      class_names=class_names)
    first = given[0]
    return DataBundle(info=info, train=splits["train"] or first, val=splits["val"],
                      test=splits["test"] or splits["val"] or first,
                      calib=splits["calib"] or splits["train"] or first)
