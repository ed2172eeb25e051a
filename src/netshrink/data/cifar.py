"""CIFAR-10 and CIFAR-100 in either of the formats they are distributed in.

* python version (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``): pickled dicts
  with a uint8 ``data`` array ``[N, 3072]`` and a list of labels. They were written by
  Python 2, so the keys are byte strings; we load them with ``encoding="bytes"`` and accept
  str keys too (for files re-saved by Python 3).
* binary version (``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz``): fixed-size
  records of label byte(s) followed by 3072 pixel bytes, plus a text file of class names.

Each image is 1024 red, then 1024 green, then 1024 blue bytes in row-major order, which is
exactly ``[3, 32, 32]``. Unpickling a downloaded file must not run code from it, so the
pickles go through an unpickler that only resolves the globals a numpy array needs.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netshrink.data.base import RawArrays
from netshrink.errors import UserError

_PIXELS = 3 * 32 * 32
_DOWNLOAD_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickled uint8 numpy array refers to.

    Files written by numpy 1.x name ``numpy.core.multiarray._reconstruct``; numpy 2 renamed
    the package to ``numpy._core`` (and importing ``numpy.core`` warns), so both names map
    to whichever object this numpy has. We hand out the objects ourselves instead of calling
    ``super().find_class``, so nothing is imported on the file's say-so.
    """
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild dicts, lists, numbers, strings and numpy arrays only.

    A pickle can call any importable function while loading (``os.system`` is the classic
    example); CIFAR batches only ever need the numpy array constructors, so everything else
    is refused before it is imported.
    """

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UserError(
                f"refusing to unpickle {module}.{name} from {self._path}: CIFAR batches "
                "contain only arrays; this file is not a CIFAR batch"
            ) from None


def _load_pickle(path: Path) -> dict[str, Any]:
    """Unpickle one CIFAR python-version file into a dict with str keys.

    Raises:
        UserError: missing file, a refused global, a broken pickle, or not a dict.
    """
    if not path.is_file():
        raise UserError(f"{path}: file not found; re-extract the CIFAR archive")
    try:
        with path.open("rb") as f:
            obj = _ArrayOnlyUnpickler(f, path).load()
    except UserError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError) as exc:
        # Whatever the unpickler trips over, the file is the problem, not our code.
        raise UserError(
            f"{path}: not a readable CIFAR python batch ({type(exc).__name__}: {exc}); "
            "re-download and extract the archive"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, found {type(obj).__name__}; "
                        "this file is not a CIFAR batch")
    # Python 2 wrote byte-string keys; files re-saved by Python 3 may have str keys.
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _batch_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` and int64 labels from one python-version batch.

    Raises:
        UserError: the batch lacks the keys or has the wrong shapes.
    """
    batch = _load_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise UserError(
            f"{path}: expected keys 'data' and {label_key!r}, found {sorted(batch)}; "
            "this file is not a CIFAR batch of this dataset"
        )
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _PIXELS:
        shape = getattr(data, "shape", None)
        raise UserError(
            f"{path}: 'data' should be a uint8 array [N, {_PIXELS}], found "
            f"{type(data).__name__} {shape}; re-download the archive"
        )
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {label_key!r} is not a list of integers") from None
    if label_array.shape != (data.shape[0],):
        raise UserError(
            f"{path}: {data.shape[0]} images but {label_array.shape} {label_key!r}; "
            "the file is damaged, re-download it"
        )
    return data.reshape(-1, 3, 32, 32), label_array


def _read_records(path: Path, label_bytes: int, label_index: int) -> tuple[np.ndarray, ...]:
    """Images and labels from one binary-version file of ``label_bytes + 3072`` records.

    Args:
        path: the ``.bin`` file.
        label_bytes: 1 for CIFAR-10, 2 for CIFAR-100 (coarse then fine label).
        label_index: which of the label bytes to return.

    Raises:
        UserError: the file is missing, empty, or not a whole number of records.
    """
    if not path.is_file():
        raise UserError(f"{path}: file not found; re-extract the CIFAR binary archive")
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + _PIXELS
    if raw.size == 0 or raw.size % record:
        raise UserError(
            f"{path}: truncated or not a CIFAR binary file: records are {record} bytes "
            f"({label_bytes} label + {_PIXELS} pixel), found {raw.size} bytes, which is not a "
            "whole number of records; re-download the archive"
        )
    rows = raw.reshape(-1, record)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32)
    return images, rows[:, label_index].astype(np.int64)


def _read_names(path: Path) -> list[str]:
    """Class names, one a line, from a binary-version ``*.txt`` file (blank lines dropped)."""
    if not path.is_file():
        raise UserError(f"{path}: file not found; re-extract the CIFAR binary archive")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant keeps its files, in both distributed formats."""

    title: str
    num_classes: int
    archive: str
    python_dir: str
    python_train: tuple[str, ...]
    python_test: str
    python_meta: str
    python_label_key: str
    python_names_key: str
    binary_dir: str
    binary_train: tuple[str, ...]
    binary_test: str
    binary_names: str
    label_bytes: int


_CIFAR10 = _Layout(
    title="CIFAR-10", num_classes=10, archive="cifar-10-python.tar.gz",
    python_dir="cifar-10-batches-py",
    python_train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    python_test="test_batch", python_meta="batches.meta",
    python_label_key="labels", python_names_key="label_names",
    binary_dir="cifar-10-batches-bin",
    binary_train=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    binary_test="test_batch.bin", binary_names="batches.meta.txt", label_bytes=1,
)
_CIFAR100 = _Layout(
    title="CIFAR-100", num_classes=100, archive="cifar-100-python.tar.gz",
    python_dir="cifar-100-python",
    python_train=("train",), python_test="test", python_meta="meta",
    python_label_key="fine_labels", python_names_key="fine_label_names",
    binary_dir="cifar-100-binary",
    binary_train=("train.bin",), binary_test="test.bin",
    binary_names="fine_label_names.txt", label_bytes=2,
)


def _locate(root: Path, layout: _Layout) -> tuple[Path, str]:
    """Find the extracted folder: ``root`` itself or its standard subfolder.

    Returns:
        The folder and the format found there, ``"python"`` or ``"binary"``.

    Raises:
        UserError: neither format is there; the message says what to download.
    """
    # Recognise a format by its first training file, so a half-extracted folder fails
    # later naming the missing file rather than here with a vague "not found".
    candidates = [
        (root, "python", layout.python_train[0]),
        (root, "binary", layout.binary_train[0]),
        (root / layout.python_dir, "python", layout.python_train[0]),
        (root / layout.binary_dir, "binary", layout.binary_train[0]),
    ]
    for folder, fmt, first in candidates:
        if (folder / first).is_file():
            return folder, fmt
    train = layout.python_train
    train_desc = train[0] if len(train) == 1 else f"{train[0]} .. {train[-1]}"
    raise UserError(
        f"{root}: no {layout.title} files found; expected {layout.python_dir}/ "
        f"({train_desc}, {layout.python_test}, {layout.python_meta}) or "
        f"{layout.binary_dir}/ there or the files in that folder "
        f"itself; download {layout.archive} from {_DOWNLOAD_PAGE} and extract it there, "
        "or pass --data-dir"
    )


def _concat(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read(root: Path, layout: _Layout) -> RawArrays:
    folder, fmt = _locate(Path(root), layout)
    if fmt == "python":
        key = layout.python_label_key
        train = _concat([_batch_arrays(folder / name, key) for name in layout.python_train])
        test = _batch_arrays(folder / layout.python_test, key)
        meta_path = folder / layout.python_meta
        meta = _load_pickle(meta_path)
        if layout.python_names_key not in meta:
            raise UserError(f"{meta_path}: no {layout.python_names_key!r} entry; "
                            "re-download the archive")
        names = [_text(n) for n in meta[layout.python_names_key]]
    else:
        # CIFAR-100 records start with the coarse label, then the fine one we train on.
        index = layout.label_bytes - 1
        train = _concat([_read_records(folder / name, layout.label_bytes, index)
                         for name in layout.binary_train])
        test = _read_records(folder / layout.binary_test, layout.label_bytes, index)
        meta_path = folder / layout.binary_names
        names = _read_names(meta_path)
    if len(names) != layout.num_classes:
        raise UserError(f"{meta_path}: {len(names)} class names, expected "
                        f"{layout.num_classes} for {layout.title}; re-download the archive")
    for split, (_, labels) in (("train", train), ("test", test)):
        if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
            raise UserError(
                f"{folder}: {split} labels outside 0..{layout.num_classes - 1}; "
                f"these are not {layout.title} files"
            )
    # np.fromfile / unpickled arrays may be read-only or views; torch wants its own copy.
    return RawArrays(
        torch.from_numpy(np.ascontiguousarray(train[0]).copy()),
        torch.from_numpy(train[1]),
        torch.from_numpy(np.ascontiguousarray(test[0]).copy()),
        torch.from_numpy(test[1]),
        names,
    )


def read_cifar10(root: Path) -> RawArrays:
    """Read CIFAR-10 (python or binary version) from ``root``.

    Args:
        root: the extracted ``cifar-10-batches-py`` / ``cifar-10-batches-bin`` folder, or
            the folder that holds it.

    Returns:
        50000 train and 10000 test images as uint8 ``[N, 3, 32, 32]``, int64 labels and
        the ten class names.

    Raises:
        UserError: files missing, truncated, of the wrong format, or a pickle that asks
            for anything but numpy arrays.
    """
    return _read(root, _CIFAR10)


def read_cifar100(root: Path) -> RawArrays:
    """Read CIFAR-100 (python or binary version) from ``root``, with the 100 fine labels.

    Args:
        root: the extracted ``cifar-100-python`` / ``cifar-100-binary`` folder, or the
            folder that holds it.

    Returns:
        50000 train and 10000 test images as uint8 ``[N, 3, 32, 32]``, int64 fine labels
        and the 100 fine class names.

    Raises:
        UserError: files missing, truncated, of the wrong format, or a pickle that asks
            for anything but numpy arrays.
    """
    return _read(root, _CIFAR100)
