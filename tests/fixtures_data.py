"""Write tiny datasets in exactly the on-disk formats of the real downloads.

Tests (and anything else that needs a dataset without a download) call these with a
``tmp_path``; each returns what it wrote, so a test can compare the reader's output with it.

* IDX (Fashion-MNIST): big-endian header, then raw uint8, optionally gzipped.
* CIFAR python version: Python 2 pickles (protocol 2). The real files hold byte strings
  written with the ``BINSTRING`` opcodes and name ``numpy.core.multiarray._reconstruct``;
  Python 3's pickle would write bytes as ``_codecs.encode(...)`` calls and numpy 2 would
  name ``numpy._core``, so ``Py2Pickler`` writes what Python 2 + numpy 1 wrote.
* CIFAR binary version: records of label byte(s) + 3072 pixel bytes, class names as text.
* Image folders: small random PNG and JPEG files in ``train/<class>`` and ``val/<class>``.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
CIFAR100_FINE_NAMES = [f"fine_{i:02d}" for i in range(100)]
CIFAR100_COARSE_NAMES = [f"coarse_{i:02d}" for i in range(20)]


class Written(NamedTuple):
    """What a writer put on disk (numpy, as the reader should return it)."""

    train_images: np.ndarray  # uint8 [N, C, H, W]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


def _images(rng: np.random.Generator, n: int, c: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def _labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    # Cycle through the classes, then shuffle: every class appears when n >= classes.
    return rng.permutation(np.arange(n) % classes).astype(np.int64)


# --------------------------------------------------------------------------- IDX


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_idx_dataset(root: Path, n_train: int, n_test: int, gz: bool = True,
                      seed: int = 0) -> Written:
    """Write the four Fashion-MNIST IDX files (28x28, labels 0..9) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = Written(
        _images(rng, n_train, 1, 28, 28), _labels(rng, n_train, 10),
        _images(rng, n_test, 1, 28, 28), _labels(rng, n_test, 10), [],
    )
    suffix = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{suffix}", out.train_images[:, 0])
    write_idx(root / f"train-labels-idx1-ubyte{suffix}", out.train_labels.astype(np.uint8))
    write_idx(root / f"t10k-images-idx3-ubyte{suffix}", out.test_images[:, 0])
    write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", out.test_labels.astype(np.uint8))
    return out


# --------------------------------------------------------------------------- CIFAR python


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us swap opcodes
    """Protocol-2 pickler that writes what Python 2's cPickle wrote for CIFAR.

    ``bytes`` and (ASCII) ``str`` become Python 2 ``str`` (SHORT_BINSTRING / BINSTRING),
    and numpy 2's ``numpy._core`` module is written as numpy 1's ``numpy.core``.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=2)

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("ascii")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def write_py2_pickle(path: Path, obj: Any) -> Path:
    """Pickle ``obj`` the way the CIFAR python-version files were written."""
    with path.open("wb") as f:
        Py2Pickler(f).dump(obj)
    return path


def _cifar_batch(images: np.ndarray, labels: dict[str, np.ndarray], title: str) -> dict:
    batch: dict[bytes, Any] = {
        b"batch_label": title.encode(),
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(images))],
    }
    # Real batches hold labels as Python lists of ints, not arrays.
    batch.update({key.encode(): [int(v) for v in values] for key, values in labels.items()})
    return batch


def write_cifar10_python(root: Path, n_per_batch: int, n_test: int | None = None,
                         seed: int = 0) -> Written:
    """Write ``root/cifar-10-batches-py`` with five training batches, a test batch and meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_test = n_per_batch if n_test is None else n_test
    train_images = _images(rng, 5 * n_per_batch, 3, 32, 32)
    train_labels = _labels(rng, 5 * n_per_batch, 10)
    for i in range(5):
        part = slice(i * n_per_batch, (i + 1) * n_per_batch)
        write_py2_pickle(folder / f"data_batch_{i + 1}", _cifar_batch(
            train_images[part], {"labels": train_labels[part]}, f"training batch {i + 1} of 5"))
    test_images, test_labels = _images(rng, n_test, 3, 32, 32), _labels(rng, n_test, 10)
    write_py2_pickle(folder / "test_batch",
                     _cifar_batch(test_images, {"labels": test_labels}, "testing batch 1 of 1"))
    write_py2_pickle(folder / "batches.meta", {
        b"num_cases_per_batch": n_per_batch,
        b"label_names": [n.encode() for n in CIFAR10_NAMES],
        b"num_vis": 3072,
    })
    return Written(train_images, train_labels, test_images, test_labels, list(CIFAR10_NAMES))


def write_cifar100_python(root: Path, n_train: int, n_test: int, seed: int = 0) -> Written:
    """Write ``root/cifar-100-python/{train,test,meta}`` with fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = Written(
        _images(rng, n_train, 3, 32, 32), _labels(rng, n_train, 100),
        _images(rng, n_test, 3, 32, 32), _labels(rng, n_test, 100), list(CIFAR100_FINE_NAMES),
    )
    for name, images, fine in (("train", out.train_images, out.train_labels),
                               ("test", out.test_images, out.test_labels)):
        labels = {"fine_labels": fine, "coarse_labels": fine // 5}
        write_py2_pickle(folder / name, _cifar_batch(images, labels, name))
    write_py2_pickle(folder / "meta", {
        b"fine_label_names": [n.encode() for n in CIFAR100_FINE_NAMES],
        b"coarse_label_names": [n.encode() for n in CIFAR100_COARSE_NAMES],
    })
    return out


# --------------------------------------------------------------------------- CIFAR binary


def _records(images: np.ndarray, *label_columns: np.ndarray) -> bytes:
    labels = np.stack(label_columns, axis=1).astype(np.uint8)
    return np.concatenate([labels, images.reshape(len(images), -1)], axis=1).tobytes()


def write_cifar10_binary(root: Path, n_per_batch: int, n_test: int | None = None,
                         seed: int = 0) -> Written:
    """Write ``root/cifar-10-batches-bin`` (1 label byte + 3072 pixel bytes per record)."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_test = n_per_batch if n_test is None else n_test
    out = Written(
        _images(rng, 5 * n_per_batch, 3, 32, 32), _labels(rng, 5 * n_per_batch, 10),
        _images(rng, n_test, 3, 32, 32), _labels(rng, n_test, 10), list(CIFAR10_NAMES),
    )
    for i in range(5):
        part = slice(i * n_per_batch, (i + 1) * n_per_batch)
        (folder / f"data_batch_{i + 1}.bin").write_bytes(
            _records(out.train_images[part], out.train_labels[part]))
    (folder / "test_batch.bin").write_bytes(_records(out.test_images, out.test_labels))
    # The real file ends with blank lines.
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    return out


def write_cifar100_binary(root: Path, n_train: int, n_test: int, seed: int = 0) -> Written:
    """Write ``root/cifar-100-binary`` (coarse byte, fine byte, 3072 pixel bytes)."""
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = Written(
        _images(rng, n_train, 3, 32, 32), _labels(rng, n_train, 100),
        _images(rng, n_test, 3, 32, 32), _labels(rng, n_test, 100), list(CIFAR100_FINE_NAMES),
    )
    (folder / "train.bin").write_bytes(
        _records(out.train_images, out.train_labels // 5, out.train_labels))
    (folder / "test.bin").write_bytes(
        _records(out.test_images, out.test_labels // 5, out.test_labels))
    (folder / "fine_label_names.txt").write_text("\n".join(CIFAR100_FINE_NAMES) + "\n")
    (folder / "coarse_label_names.txt").write_text("\n".join(CIFAR100_COARSE_NAMES) + "\n")
    return out


# --------------------------------------------------------------------------- image folders


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "eel"),
    per_class: int = 4,
    val_per_class: int = 2,
    size: tuple[int, int] = (40, 30),
    seed: int = 0,
) -> dict[str, list[tuple[Path, int]]]:
    """Write ``root/{train,val}/<class>/`` with small random images, PNG and JPEG mixed.

    Returns:
        For ``"train"`` and ``"val"``: ``(path, label)`` in the readers' sorted order.
    """
    rng = np.random.default_rng(seed)
    written: dict[str, list[tuple[Path, int]]] = {"train": [], "val": []}
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label, name in enumerate(sorted(classes)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                ext = ".png" if i % 2 == 0 else ".JPEG"  # ImageNet's own extension
                path = folder / f"{name}_{i:03d}{ext}"
                Image.fromarray(pixels).save(path, format="PNG" if ext == ".png" else "JPEG")
                written[split].append((path, label))
    for split in written:
        written[split].sort(key=lambda item: (item[1], item[0].name))
    return written
