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

import io
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from netshrink.data.base import RawArrays
from netshrink.errors import UserError
from netshrink.limits import element_count, read_regular

_PIXELS = 3 * 32 * 32
_DOWNLOAD_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


# What one CIFAR file may be: the largest real ones (CIFAR-100's train and train.bin)
# are 155 MB.
MAX_CIFAR_BYTES = 256 << 20
# Opcodes one pickle may run. Each can make the pure-Python unpickler hold a new object
# (a 1-byte EMPTY_LIST or MARK is a 56-byte list), so a file of a few hundred MB of them
# would take gigabytes; CIFAR-100's train file, the largest, runs about 200,000 (also
# when re-saved by Python 3, which memoizes each string as its own opcode).
MAX_PICKLE_OPS = 1 << 19
MAX_NAMES_BYTES = 1 << 20
_ALLOWED_KINDS = frozenset("biuf")  # numeric arrays only: no objects, strings or voids
_KEY_TYPES = (str, bytes)  # CIFAR dicts are keyed by names, nothing else


def _reconstruct_fn() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _NdarrayToken:
    """What a pickle gets for ``numpy.ndarray``: only ``_reconstruct`` may use it.

    Called directly (``REDUCE``/``NEWOBJ``), ``numpy.ndarray(shape)`` would allocate any
    shape the file names; the token refuses instead.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("the file calls numpy.ndarray directly, which CIFAR "
                                     "batches never do")


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype(spec)`` for plain numeric types only (what a CIFAR array can be)."""
    del align, copy  # a fresh dtype is built either way; alignment means nothing here
    if not isinstance(spec, str | bytes) or len(spec) > 16:
        raise pickle.UnpicklingError("a dtype that is not a short type code")
    try:
        dt = np.dtype(spec.decode("ascii") if isinstance(spec, bytes) else spec)
    except (TypeError, ValueError, UnicodeDecodeError):
        raise pickle.UnpicklingError(f"unknown dtype {spec[:16]!r}") from None
    if dt.kind not in _ALLOWED_KINDS or dt.itemsize > 16:
        raise pickle.UnpicklingError(f"dtype {dt.str!r}, not a numeric type")
    return dt


def _counted(op: Callable[[Any], None]) -> Callable[[Any], None]:
    """``op``, an unpickler's handler of one opcode, counting the opcode first."""
    def step(unpickler: Any) -> None:
        unpickler._count()
        op(unpickler)
    return step


class _ArrayOnlyUnpickler(pickle._Unpickler):  # the pure-Python one: its steps can be checked
    """An unpickler that can rebuild dicts, lists, numbers, strings and numpy arrays only.

    A pickle can call any importable function while loading (``os.system`` is the classic
    example); CIFAR batches only ever need the numpy array constructors, so everything else
    is refused before it is imported. What those constructors may build is bounded too:
    numeric dtypes only, and no array larger than the file it comes from (``limit``
    bytes), checked before it is allocated. Dict keys must be strings (hashing a
    crafted nest of tuples could take forever), sets are refused, and ``BUILD`` only
    fills in arrays. The pure-Python unpickler reads from an in-memory copy of the file,
    so no opcode can make it allocate more than the file holds.
    """

    dispatch = pickle._Unpickler.dispatch.copy()

    def __init__(self, file: Any, path: Path, limit: int) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._budget = limit  # array bytes left to build: all arrays together fit the file
        self._ops = 0
        self._allowed = {
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy", "ndarray"): _NdarrayToken,
            ("numpy", "dtype"): _dtype,
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise UserError(
                f"refusing to unpickle {str(module)[:80]}.{str(name)[:80]} from "
                f"{self._path}: CIFAR batches contain only arrays; this file is not a "
                "CIFAR batch"
            ) from None

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        """numpy's ``_reconstruct(ndarray, shape, dtype)``, for ``ndarray`` and a size the
        file can fill (real files pass shape ``(0,)``; ``BUILD`` sets the data)."""
        if subtype is not _NdarrayToken:
            raise pickle.UnpicklingError("_reconstruct of something other than an ndarray")
        dt = dtype if isinstance(dtype, np.dtype) else _dtype(dtype)
        if dt.kind not in _ALLOWED_KINDS:
            raise pickle.UnpicklingError(f"dtype {dt.str!r}, not a numeric type")
        self._check_size(shape, dt)
        return _reconstruct_fn()(np.ndarray, tuple(shape), dt)

    def _check_size(self, shape: Any, dt: np.dtype) -> int:
        """The element count of ``shape``, taken from the budget of array bytes."""
        if not isinstance(shape, tuple | list):
            raise pickle.UnpicklingError("an array shape that is not a tuple")
        try:
            n = element_count(shape, itemsize=dt.itemsize, available=self._budget)
        except ValueError as exc:
            raise pickle.UnpicklingError(f"arrays larger than the file ({exc})") from None
        self._budget -= n * dt.itemsize
        return n

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            # numpy's dtype state (version, byte order, ..., item size, alignment, flags)
            # can change a flexible type's size; a plain numeric dtype needs none of it.
            native = ("|", "=", "<" if np.little_endian else ">")
            if (not isinstance(state, tuple) or len(state) < 2
                    or state[1] not in (*native, *(c.encode() for c in native))
                    or any(v is not None for v in state[2:5])
                    or (len(state) > 5 and state[5] not in (-1, inst.itemsize))):
                raise pickle.UnpicklingError("a dtype state other than a plain numeric type's")
            return
        if isinstance(inst, np.ndarray):
            if not isinstance(state, tuple) or len(state) != 5:
                raise pickle.UnpicklingError("an array state of an unknown layout")
            _, shape, dt, _, raw = state
            if not isinstance(dt, np.dtype) or dt.kind not in _ALLOWED_KINDS \
                    or not isinstance(raw, bytes | bytearray):
                raise pickle.UnpicklingError("an array state that is not numeric bytes")
            n = self._check_size(shape, dt)
            if n * dt.itemsize != len(raw):
                raise pickle.UnpicklingError(f"an array of shape {tuple(shape)[:8]} with "
                                             f"{len(raw)} bytes of data")
            inst.__setstate__(state)
            return
        raise pickle.UnpicklingError(f"BUILD of a {type(inst).__name__}, which CIFAR batches "
                                     "never hold")

    dispatch[pickle.BUILD[0]] = load_build

    def _check_keys(self, items: list[Any]) -> None:
        if not all(isinstance(k, _KEY_TYPES) for k in items[0::2]):
            raise pickle.UnpicklingError("a dict key that is not a string")

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._check_keys(items)
        target = self.stack[-1]
        if not isinstance(target, dict):
            raise pickle.UnpicklingError("SETITEMS on something other than a dict")
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._check_keys([key, value])
        target = self.stack[-1]
        if not isinstance(target, dict):
            raise pickle.UnpicklingError("SETITEM on something other than a dict")
        target[key] = value

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_dict(self) -> None:
        items = self.pop_mark()
        self._check_keys(items)
        self.append({items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)})

    dispatch[pickle.DICT[0]] = load_dict

    def _refuse_sets(self) -> None:
        raise pickle.UnpicklingError("a set, which CIFAR batches never hold")

    for _op in (pickle.ADDITEMS, pickle.FROZENSET, pickle.EMPTY_SET):
        dispatch[_op[0]] = _refuse_sets
    del _op

    def _count(self) -> None:
        self._ops += 1
        if self._ops > MAX_PICKLE_OPS:
            raise pickle.UnpicklingError(f"more than {MAX_PICKLE_OPS:,} pickle operations, "
                                         "far more than a CIFAR batch holds")

    # Every opcode counts (the loop in ``load`` looks each one up here), so what the
    # unpickler holds is bounded by the file's bytes plus a few dozen bytes an opcode.
    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = {
        code: _counted(op) for code, op in dispatch.items()}


def _load_pickle(path: Path) -> dict[str, Any]:
    """Unpickle one CIFAR python-version file into a dict with str keys.

    Raises:
        UserError: missing file, a refused global, a broken pickle, or not a dict.
    """
    if not path.exists():
        raise UserError(f"{path}: file not found; re-extract the CIFAR archive")
    data = read_regular(path, "CIFAR batch", max_bytes=MAX_CIFAR_BYTES)
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(data), path, len(data)).load()
    except UserError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError, struct.error, MemoryError) as exc:
        # Whatever the unpickler trips over, the file is the problem, not our code.
        reason = " ".join(str(exc).split())[:160] or "the data ends early"
        raise UserError(
            f"{path}: not a readable CIFAR python batch ({type(exc).__name__}: {reason}); "
            "re-download and extract the archive"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, found {type(obj).__name__}; "
                        "this file is not a CIFAR batch")
    # Python 2 wrote byte-string keys; files re-saved by Python 3 may have str keys.
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n[:40]) for n in names[:8])
    return f"[{shown}{', ...' if len(names) > 8 else ''}]"


def _text(value: Any, path: Path) -> str:
    if isinstance(value, bytes | str) and len(value) <= 1000:
        try:
            return value.decode("utf-8") if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            pass
    raise UserError(f"{path}: a class name that is not a short UTF-8 string; "
                    "re-download the archive")


def _label_array(labels: Any, n: int, path: Path, key: str) -> np.ndarray:
    """Labels as int64 ``[n]``: a list of ints or a 1-D integer array, nothing nested."""
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        array = labels.astype(np.int64)
    elif isinstance(labels, list) and all(type(v) is int for v in labels):
        try:
            array = np.array(labels, dtype=np.int64)
        except OverflowError:
            raise UserError(f"{path}: {key!r} holds a number too large for a label") from None
    else:
        raise UserError(f"{path}: {key!r} is not a list of integers; re-download the archive")
    if array.shape != (n,):
        raise UserError(
            f"{path}: {n} images but {array.shape} {key!r}; "
            "the file is damaged, re-download it"
        )
    return array


def _batch_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` and int64 labels from one python-version batch.

    Raises:
        UserError: the batch lacks the keys or has the wrong shapes.
    """
    batch = _load_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise UserError(
            f"{path}: expected keys 'data' and {label_key!r}, found {_few(sorted(batch))}; "
            "this file is not a CIFAR batch of this dataset"
        )
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _PIXELS:
        shape = data.shape if isinstance(data, np.ndarray) else None
        raise UserError(
            f"{path}: 'data' should be a uint8 array [N, {_PIXELS}], found "
            f"{type(data).__name__} {shape}; re-download the archive"
        )
    label_array = _label_array(labels, data.shape[0], path, label_key)
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
    if not path.exists():
        raise UserError(f"{path}: file not found; re-extract the CIFAR binary archive")
    raw = np.frombuffer(read_regular(path, "CIFAR binary file", max_bytes=MAX_CIFAR_BYTES),
                        dtype=np.uint8)
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
    if not path.exists():
        raise UserError(f"{path}: file not found; re-extract the CIFAR binary archive")
    raw = read_regular(path, "class-name file", max_bytes=MAX_NAMES_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start} is not); it should list "
                        "the class names one a line; re-extract the CIFAR binary "
                        "archive") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


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
        raw_names = meta[layout.python_names_key]
        if not isinstance(raw_names, list):
            raise UserError(f"{meta_path}: {layout.python_names_key!r} is not a list of "
                            "names; re-download the archive")
        names = [_text(n, meta_path) for n in raw_names]
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
    return RawArrays(_tensor(train[0]), torch.from_numpy(train[1]), _tensor(test[0]),
                     torch.from_numpy(test[1]), names)


def _tensor(images: np.ndarray) -> torch.Tensor:
    """``images`` as a tensor of its own memory: arrays over a file's bytes are read-only
    views and torch wants writable ones, but a second copy of an array that already is
    one (a concatenation) would double the peak for nothing."""
    images = np.ascontiguousarray(images)
    return torch.from_numpy(images if images.flags.writeable else images.copy())


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
