"""The user's data through a factory: ``data: {factory: pkg.mod:fn, kwargs: {...}}``.

The recipe that names a factory is the user's own instruction, so the factory is
imported and called. A file is never a reason to import one: a model file records the
factory its data came from for information only, and the commands ask for ``--data
pkg.mod:fn`` before importing it. It returns the training, validation (optional) and
test data:

    {"train": ..., "val": ..., "test": ..., "class_names": [...]}   # val, class_names optional
    (train, test) or (train, val, test)

each a map-style torch ``Dataset`` of ``(image tensor [C, H, W], class index)`` items
(normalised as the model expects), or a ``DataLoader`` over one. netshrink batches them
itself (each stage's batch size, a seeded order), keeping a loader's ``collate_fn`` and
``num_workers``, so it can hold out validation images by index (``data.val_size``, when
no ``val`` is given), cut a calibration subset and fingerprint the data for the model
cache. The data's own transforms run as written (``data.augment`` is for netshrink's
datasets): held-out validation images pass through the training transforms, so a factory
with random augmentation should return its own ``val``.

``netshrink.compress(model, out, train=..., val=..., test=...)`` takes such data
directly: it is held in this process under its fingerprint (``in_memory_source``) and
named by the built-in factory ``IN_MEMORY_FACTORY``, which only the calling process can
serve.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from netshrink.data.base import DataBundle
from netshrink.data.bounds import max_classes
from netshrink.data.dataset_split import DatasetSplit, dataset_split
from netshrink.data.user import image_info
from netshrink.errors import UserError
from netshrink.limits import IMPORT_PATH, clip

if TYPE_CHECKING:
    from netshrink.data import DataConfig

__all__ = ["FACTORY_PATH", "IN_MEMORY_FACTORY", "DatasetSplit", "UserData", "build_factory_data",
           "in_memory_source", "load_factory", "user_data"]

FACTORY_PATH = IMPORT_PATH
IN_MEMORY_FACTORY = "netshrink.data.factory:in_memory"
SAMPLED_ITEMS = 8  # items of each split hashed into the fingerprint
_KEYS = ("train", "val", "test", "calib", "class_names", "mean", "std")
EXPECTED = ("return a dict {'train': ..., 'val': ... (optional), 'test': ...} or a tuple "
            "(train, test) / (train, val, test), each a torch Dataset of (image tensor "
            "[C, H, W], class index) items or a DataLoader over one")


@dataclass
class UserData:
    """What a factory returned, checked: the splits and the optional facts about them."""

    name: str  # what model files record as their dataset (the factory)
    train: DatasetSplit
    test: DatasetSplit
    val: DatasetSplit | None = None
    calib: DatasetSplit | None = None
    class_names: list[str] | None = None  # as given
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    _classes: list[str] | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    def classes(self) -> list[str]:
        """The class names: as given, else the training data's ``classes`` (torchvision's
        datasets have them), else one per index up to the largest training label."""
        if self._classes is None:
            named = getattr(self.train.dataset, "classes", None)
            if self.class_names is not None:
                self._classes = self.class_names
            elif isinstance(named, (list, tuple)) and named and all(
                    isinstance(c, str) for c in named):
                self._classes = list(named)
            else:
                self._classes = [str(i) for i in range(_label_count(self.train))]
        return self._classes

    def fingerprint(self) -> str:
        """A cheap content hash: each split's length and ``SAMPLED_ITEMS`` items spread
        over it (transforms seeded), and the facts given. A change that keeps a split's
        length and misses the sampled items is not seen: change ``data.kwargs`` then."""
        if self._fingerprint is None:
            h = hashlib.sha256(repr((self.class_names, self.mean, self.std)).encode())
            with _seeded():
                for key in ("train", "val", "test", "calib"):
                    split = getattr(self, key)
                    h.update(f"{key}:{len(split) if split is not None else -1};".encode())
                    for i in _spread(len(split) if split is not None else 0):
                        _hash_item(h, split.item(i))  # type: ignore[union-attr]
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def _spread(n: int, k: int = SAMPLED_ITEMS) -> list[int]:
    """Up to ``k`` indices spread evenly over ``n``, the first and last among them."""
    if n <= k:
        return list(range(n))
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def _hash_item(h: Any, item: Any) -> None:
    image = item[0].detach().cpu().contiguous()
    h.update(f"{image.dtype}{tuple(image.shape)}{int(item[1])};".encode())
    h.update(image.reshape(-1).view(torch.uint8).numpy().tobytes())


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Random transforms draw the same numbers every time (torch, numpy, ``random``),
    and the caller's generators are left as they were."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _label_count(split: DatasetSplit) -> int:
    """One more than the largest label: from the dataset's ``targets`` where it has them
    for every item, else read from every training item once."""
    targets = getattr(split.dataset, "targets", None)
    if split.indices is None and targets is not None:
        try:
            labels = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError):
            labels = None
        if labels is not None and labels.shape == (len(split),):
            return _checked_count(labels, split.name)
    low, top = 0, -1
    for _, y in split.batches(256):
        low, top = min(low, int(y.min())), max(top, int(y.max()))
    return _checked_count(torch.tensor([low, top]), split.name)


def _checked_count(labels: Tensor, where: str) -> int:
    if labels.numel() == 0 or labels.is_floating_point() or int(labels.min()) < 0:
        raise UserError(f"{where}: labels must be class indices 0, 1, 2, ...")
    count = int(labels.max()) + 1
    if count > max_classes():
        raise UserError(f"{where}: a label of {count - 1:,}, more classes than the "
                        f"{max_classes():,} netshrink takes; are they class indices?")
    return count


def _floats(value: Any, where: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: give a list of numbers, one per channel") from None


def user_data(returned: Any, name: str, where: str | None = None) -> UserData:
    """What the factory ``name`` returned, checked (see the module docstring); ``where``
    starts each message (default: ``data.factory NAME``).

    Raises:
        UserError: in one line: what is wrong and what is expected.
    """
    if isinstance(returned, UserData):
        return returned
    where = where or f"data.factory {name}"
    if isinstance(returned, tuple) and len(returned) in (2, 3):
        keys = ("train", "test") if len(returned) == 2 else ("train", "val", "test")
        returned = dict(zip(keys, returned, strict=True))
    if not isinstance(returned, Mapping):
        raise UserError(f"{where} returned a {type(returned).__name__}; {EXPECTED}")
    unknown = [str(k) for k in returned if k not in _KEYS]
    if unknown:
        raise UserError(f"{where} returned the unknown key(s) {clip(', '.join(unknown), 80)}; "
                        f"known: {', '.join(_KEYS)}")
    missing = [k for k in ("train", "test") if returned.get(k) is None]
    if missing:
        raise UserError(f"{where}: no {' and no '.join(missing)} data; {EXPECTED}")
    splits = {k: None if returned.get(k) is None else dataset_split(returned[k], f"{where}: {k}")
              for k in ("train", "val", "test", "calib")}
    val, test = splits["val"], splits["test"]
    if val is not None and test is not None and val.dataset is test.dataset:
        raise UserError(f"{where}: val and test are the same data; decisions are made on "
                        "val and figures reported on test, so give them different images")
    names = returned.get("class_names")
    if names is not None and not (isinstance(names, (list, tuple)) and names
                                  and len(names) <= max_classes()):
        raise UserError(f"{where}: class_names must be a list of names, one per class")
    facts = {k: _floats(returned[k], f"{where}: {k}") for k in ("mean", "std")
             if returned.get(k) is not None}
    return UserData(name=name, train=splits["train"], test=test,  # type: ignore[arg-type]
                    val=val, calib=splits["calib"],
                    class_names=[str(c) for c in names] if names is not None else None,
                    **facts)


def load_factory(factory: str) -> Callable[..., Any]:
    """The function ``factory`` (``package.module:function``) names, imported.

    Raises:
        UserError: not an import path, or it cannot be imported.
    """
    if not isinstance(factory, str) or not FACTORY_PATH.fullmatch(factory):
        raise UserError(f"data.factory {clip(repr(factory), 80)} is not an import path; "
                        "give 'package.module:function' (the function that returns the data)")
    module_name, function = factory.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"data.factory {factory}: cannot import it ({clip(str(exc), 120)}); "
                        "install its package or put its folder on PYTHONPATH (study workers "
                        "and Ray tasks import it too)") from None
    if not callable(fn):
        raise UserError(f"data.factory {factory}: a {type(fn).__name__}, not a function")
    return fn


def call_factory(factory: str, kwargs: Mapping[str, Any]) -> UserData:
    """Import ``factory``, call it with ``kwargs`` and check what it returns.

    Raises:
        UserError: it cannot be imported, refuses the arguments, or returns what is not
            data (see ``user_data``).
    """
    fn = load_factory(factory)
    try:
        returned = fn(**kwargs)
    except UserError:
        raise
    except (TypeError, ValueError, RuntimeError, OSError, KeyError, IndexError) as exc:
        raise UserError(f"data.factory {factory} failed with the arguments "
                        f"{clip(repr(dict(kwargs)), 80)} ({type(exc).__name__}: "
                        f"{clip(' '.join(str(exc).split()), 160)})") from None
    return user_data(returned, factory)


def bundle_of(data: UserData, cfg: DataConfig) -> DataBundle:
    """``data`` cut as ``cfg`` says: validation held out of train when not given
    (``val_size``, ``seed``), the calibration subset from train, the limits applied.

    Raises:
        UserError: ``image_size`` differs from the images', or they are not square.
    """
    from netshrink.data import check_eval_batch, split_indices

    first = data.train.item(0)[0]
    info = image_info(first.shape, name=data.name, num_classes=len(data.classes()),
                      class_names=data.classes(), mean=data.mean, std=data.std)
    if cfg.image_size is not None and cfg.image_size != info.image_size:
        raise UserError(f"data.image_size {cfg.image_size} but {data.name}'s images are "
                        f"{info.image_size}x{info.image_size}; resize them in the factory "
                        "(or leave image_size out)")
    train, test = data.train, data.test
    if cfg.train_limit is not None:
        train = train.subset(torch.arange(min(cfg.train_limit, len(train))))
    if cfg.test_limit is not None:
        test = test.subset(torch.arange(min(cfg.test_limit, len(test))))
    check_eval_batch(cfg, info, max(len(train), len(test)))
    val = data.val
    if val is None:
        train_idx, val_idx, calib_idx = split_indices(len(train), cfg.val_size,
                                                      cfg.calib_size, cfg.seed)
        val = train.subset(val_idx) if len(val_idx) else None
        kept = train.subset(train_idx)
    else:
        kept, order = train, torch.randperm(len(train),
                                            generator=torch.Generator().manual_seed(cfg.seed))
        calib_idx = order[: min(cfg.calib_size, len(train))]
    calib = data.calib if data.calib is not None else train.subset(calib_idx)
    return DataBundle(info=info, train=kept, val=val, test=test, calib=calib,
                      fingerprint=data.fingerprint())


def build_factory_data(cfg: DataConfig) -> DataBundle:
    """The ``DataBundle`` of the factory ``cfg.factory`` names.

    Raises:
        UserError: see ``call_factory`` and ``bundle_of``.
    """
    assert cfg.factory is not None
    if cfg.root is not None:  # --data-dir on a recipe whose data is a factory's
        raise UserError(f"data.root {cfg.root} and data.factory {cfg.factory}: a factory "
                        "reads its own files; pass their place in data.kwargs")
    return bundle_of(call_factory(cfg.factory, cfg.kwargs), cfg)


# ---------------------------------------------------------------------- in this process

_IN_MEMORY: dict[str, UserData] = {}


def in_memory(key: str) -> UserData:
    """The built-in factory of data registered in this process (``in_memory_source``).

    Raises:
        UserError: nothing is registered under ``key`` here (another process).
    """
    try:
        return _IN_MEMORY[key]
    except KeyError:
        raise UserError("the DataLoaders given to netshrink.compress live in the calling "
                        "process only: run its candidates there (no study workers, no Ray), "
                        "or name a data factory (data: {factory: pkg.mod:fn}) that other "
                        "processes can import") from None


@contextlib.contextmanager
def in_memory_source(splits: Mapping[str, Any], *, name: str = "custom",
                     where: str = "data") -> Iterator[dict[str, Any]]:
    """Hold the user's data (``user_data``'s dict) in this process for the duration:
    yields the recipe ``data:`` section naming it, keyed by its content fingerprint (so
    the same data gives the same stage keys and an interrupted search resumes).

    Raises:
        UserError: what ``user_data`` refuses.
    """
    data = user_data({k: v for k, v in splits.items() if v is not None}, name, where)
    data.classes()  # once, not once per candidate
    key = data.fingerprint()
    added = key not in _IN_MEMORY
    if added:
        _IN_MEMORY[key] = data
    try:
        yield {"factory": IN_MEMORY_FACTORY, "kwargs": {"key": key}}
    finally:
        if added:
            _IN_MEMORY.pop(key, None)
