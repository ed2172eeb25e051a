"""Datasets read from disk in the formats people have, or the user's own through a
factory (``netshrink.data.factory``), split deterministically.

``build_data(DataConfig(...))`` returns a ``DataBundle`` with train / val / test / calib
splits. The validation split is held out of the training set with a seeded permutation,
the calibration subset is drawn from what remains for training, so neither overlaps the
test set we report on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from netshrink.data.base import (
    ArraySplit,
    Augment,
    Batch,
    DataBundle,
    DatasetInfo,
    RawArrays,
    Split,
    shard_rows,
)
from netshrink.data.bounds import check_batch, check_image_size
from netshrink.errors import UserError
from netshrink.limits import MAX_SEED
from netshrink.registry import Registry

__all__ = [
    "DATASETS", "ArraySplit", "Augment", "Batch", "DataBundle", "DataConfig", "DatasetInfo",
    "RawArrays", "Split", "build_data", "data_source", "shard_rows", "split_indices",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_FACTORY_KWARGS_BYTES = 1 << 16  # a factory's arguments: paths, sizes, flags


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset and what its images look like."""

    read: Callable[[Path | None], RawArrays] | None  # None: image folders, read lazily
    default_root: Path | None
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment


DATASETS: Registry[DatasetSpec] = Registry("dataset")


class DataConfig(BaseModel):
    """The ``data:`` section of a recipe.

    Attributes:
        name: a registered dataset (``netshrink list datasets``).
        factory: instead of ``name``, the user's function that returns their data
            (``package.module:function``; see ``netshrink.data.factory``), imported and
            called because the recipe names it.
        kwargs: the factory's keyword arguments (plain values).
        root: folder holding the files; each dataset has a default where one exists.
        image_size: side the model sees; in-memory datasets are resized to it. At most
            ``NETSHRINK_MAX_IMAGE_SIZE`` (2048; see ``netshrink.data.bounds``).
        val_size: images held out of the training set for validation (0: none; default
            10% of the training set, at most 5000).
        calib_size: training images kept aside as the quantization calibration subset.
        batch_size: evaluation batch size.
        augment: use the dataset's training augmentation.
        train_limit: keep only the first N training images (quick runs and tests).
        test_limit: keep only the first N test images (quick runs and tests).
        num_workers: decoding processes for image folders.
        seed: the split seed.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "fashion_mnist"
    root: Path | None = None
    image_size: int | None = Field(default=None, gt=0)
    val_size: int | None = Field(default=None, ge=0)
    calib_size: int = Field(default=512, gt=0)
    batch_size: int = Field(default=256, gt=0)
    augment: bool = True
    train_limit: int | None = Field(default=None, gt=0)
    test_limit: int | None = Field(default=None, gt=0)
    num_workers: int = Field(default=2, ge=0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A dataset's section dumps as it always has (its stage keys, recipe hashes and
        # cached stages unchanged); a factory's has no dataset name.
        out = handler(self)
        if self.factory is None:
            out.pop("factory", None)
            out.pop("kwargs", None)
        else:
            out.pop("name", None)
            out.pop("root", None)
        return out

    @field_validator("factory")
    @classmethod
    def _import_path(cls, factory: str | None) -> str | None:
        from netshrink.data.factory import FACTORY_PATH

        if factory is not None and not FACTORY_PATH.fullmatch(factory):
            raise ValueError(f"data.factory {factory[:80]!r} is not an import path; give "
                             "'package.module:function' (the function that returns the data)")
        return factory

    @field_validator("kwargs")
    @classmethod
    def _plain_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        # They go into the stage keys and run.json as JSON: objects would key by their
        # repr (another key each run), and a large value is a mistake.
        try:
            text = json.dumps(kwargs, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"data.kwargs must be plain values (text, numbers, lists, "
                             f"mappings): {str(exc)[:120]}") from None
        if len(text) > MAX_FACTORY_KWARGS_BYTES:
            raise ValueError(f"data.kwargs take {len(text):,} bytes of JSON, more than "
                             f"{MAX_FACTORY_KWARGS_BYTES:,}; pass a path to a file instead")
        return kwargs

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.factory is None:
            if self.kwargs:
                raise ValueError("data.kwargs are a factory's arguments; name the factory "
                                 "(data.factory: package.module:function)")
            return self
        given = "name" if "name" in self.model_fields_set else (
            "root" if self.root is not None else None)
        if given is not None:
            raise ValueError(f"data.{given} and data.factory: give one source; a factory "
                             "reads its own files (pass their place in data.kwargs)")
        return self

    @field_validator("num_workers")
    @classmethod
    def _bounded_workers(cls, workers: int) -> int:
        # Each worker is a process holding its own batches: thousands would exhaust the
        # machine before a single image is decoded.
        limit = max(64, 2 * (os.cpu_count() or 1))
        if workers > limit:
            raise ValueError(f"data.num_workers {workers:,} is more than {limit} (twice the "
                             "cores here, at least 64); decoding processes beyond the cores "
                             "only wait: lower it")
        return workers

    @field_validator("image_size")
    @classmethod
    def _bounded_image_size(cls, size: int | None) -> int | None:
        # Every batch is images x channels x size^2 floats: 4096 at the default batch of
        # 256 asked for 51 GB. check_image_size raises UserError, which pydantic passes on.
        return size if size is None else check_image_size(size)


def check_eval_batch(cfg: DataConfig, info: DatasetInfo, largest_split: int) -> None:
    """Refuse ``cfg.batch_size`` if one evaluation batch of ``info``'s images would pass
    ``NETSHRINK_MAX_BATCH_BYTES`` (a split smaller than the batch makes a smaller one).

    Raises:
        UserError: naming ``data.batch_size`` and the fix.
    """
    check_batch("data.batch_size", cfg.batch_size, largest=largest_split,
                channels=info.in_channels, size=info.image_size)


def split_indices(
    n: int, val_size: int | None, calib_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded ``(train, val, calib)`` indices of ``n`` training images; calib is in train.

    Raises:
        UserError: ``val_size`` leaves no training images.
    """
    if val_size is None:
        val_size = min(5000, n // 10)
    if val_size >= n:
        raise UserError(f"val_size {val_size} leaves no training images out of {n}; lower it")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size], order[val_size:]
    calib = train[: min(calib_size, len(train))]
    return train, val, calib


def data_source(name: str, *, kwargs: dict[str, Any] | None = None,
                root: Path | str | None = None, named_by_file: bool = False,
                where: str = "the model file") -> dict[str, Any]:
    """The ``data:`` section's source for ``name``: a dataset's (read from ``root``), or
    a factory's (``pkg.mod:fn``, a string with ``:`` that is no dataset's name) called
    with ``kwargs``. ``named_by_file``: the name is what a model file (``where``) records,
    and a file never has a factory imported: the user names it (``--data pkg.mod:fn``).

    Raises:
        UserError: only a file names the factory; kwargs for a dataset, or a root for a
            factory.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: its dataset is {str(name)[:40]!r}, not a name; pass "
                        "--data NAME")
    if name not in DATASETS and ":" in name:
        if named_by_file:
            raise UserError(f"{where} was made on the data of the factory {name[:80]}, "
                            f"which netshrink imports only when you name it: pass --data "
                            f"{name[:80]} (data= in Python)")
        if root is not None:
            raise UserError(f"--data-dir {root}: a data factory reads its own files; pass "
                            "their place in its arguments (--data-kwargs, data_kwargs=)")
        return {"factory": name, "kwargs": dict(kwargs or {})}
    if kwargs:
        raise UserError(f"--data-kwargs are a data factory's arguments; {name!r} is a "
                        "dataset's name")
    return {"name": name, "root": str(root) if root is not None else None}


def build_data(cfg: DataConfig) -> DataBundle:
    """Read the dataset ``cfg`` names (or call its factory) and cut it into a
    ``DataBundle``.

    Raises:
        UserError: unknown dataset, missing/truncated/wrong-format files, bad sizes; a
            factory that cannot be imported or returns what is not data.
    """
    if cfg.factory is not None:
        from netshrink.data.factory import build_factory_data

        return build_factory_data(cfg)
    if cfg.name not in DATASETS and ":" in cfg.name:
        raise UserError(f"unknown dataset {cfg.name!r}; a data factory goes in data.factory "
                        "(or --data pkg.mod:fn names one when it is not a dataset's name)")
    spec = DATASETS.get(cfg.name)
    root = cfg.root if cfg.root is not None else spec.default_root
    if spec.read is None:
        from netshrink.data.imagefolder import build_image_folder

        return build_image_folder(cfg, root, spec)
    raw = spec.read(root)
    image_size = cfg.image_size or int(raw.train_images.shape[-1])
    info = DatasetInfo(
        name=cfg.name,
        num_classes=len(raw.class_names),
        in_channels=int(raw.train_images.shape[1]),
        image_size=image_size,
        class_names=raw.class_names,
        mean=spec.mean,
        std=spec.std,
    )
    augment = spec.augment if cfg.augment else Augment()
    resize = cfg.image_size

    def split(images: torch.Tensor, labels: torch.Tensor) -> ArraySplit:
        return ArraySplit(images, labels, spec.mean, spec.std, resize, augment)

    # Slicing with None keeps everything: the limits are for quick runs and tests.
    limit = cfg.train_limit
    train_images, train_labels = raw.train_images[:limit], raw.train_labels[:limit]
    test_images, test_labels = raw.test_images[: cfg.test_limit], raw.test_labels[: cfg.test_limit]
    check_eval_batch(cfg, info, max(len(train_images), len(test_images)))
    full = split(train_images, train_labels)
    train_idx, val_idx, calib_idx = split_indices(len(full), cfg.val_size, cfg.calib_size,
                                                  cfg.seed)
    return DataBundle(
        info=info,
        train=full.subset(train_idx),
        val=full.subset(val_idx) if len(val_idx) else None,
        test=split(test_images, test_labels),
        calib=full.subset(calib_idx),
    )


def _register_builtin() -> None:
    from netshrink.data.idx import read_fashion_mnist

    DATASETS.register("fashion_mnist")(
        DatasetSpec(
            read=read_fashion_mnist,
            default_root=Path("/usr/share/datasets/fashion-mnist"),
            in_channels=1,
            image_size=28,
            mean=(0.2860,),
            std=(0.3530,),
            augment=Augment(crop_padding=2, hflip=True),
        )
    )
    # Readers are imported on first use, so `import netshrink.data` stays cheap.
    def read_cifar10(root: Path | None) -> RawArrays:
        from netshrink.data.cifar import read_cifar10 as read

        return read(root)

    def read_cifar100(root: Path | None) -> RawArrays:
        from netshrink.data.cifar import read_cifar100 as read

        return read(root)

    def read_digits(root: Path | None) -> RawArrays:
        from netshrink.data.digits import read_digits as read

        return read(root)

    cifar_augment = Augment(crop_padding=4, hflip=True)
    DATASETS.register("cifar10")(
        DatasetSpec(read_cifar10, Path("data/cifar10"), 3, 32,
                    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), cifar_augment)
    )
    DATASETS.register("cifar100")(
        DatasetSpec(read_cifar100, Path("data/cifar100"), 3, 32,
                    (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), cifar_augment)
    )
    # Digits are 8x8 and not mirror-symmetric: shift by one pixel, never flip.
    DATASETS.register("digits")(
        DatasetSpec(read_digits, None, 1, 8, (0.3059,), (0.3767,), Augment(crop_padding=1))
    )
    DATASETS.register("imagefolder")(
        DatasetSpec(None, None, 3, 224, IMAGENET_MEAN, IMAGENET_STD, Augment())
    )


_register_builtin()
