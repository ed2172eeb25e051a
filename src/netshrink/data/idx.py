"""Fashion-MNIST (and MNIST) in the IDX format, gzipped or not.

IDX: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
each dimension as a big-endian int32, then the data. We check every one of these and the
byte count, so a truncated or wrong file is named with what was expected.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from netshrink.data.base import RawArrays
from netshrink.errors import UserError

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) into a uint8 array.

    Raises:
        UserError: the file is missing, truncated, or not an unsigned-byte IDX file.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: not a readable gzip file ({exc}); re-download it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path}: not an IDX file (expected magic 0x0000 then type and rank)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise UserError(f"{path}: IDX type 0x{dtype_code:02x}; expected 0x08 (unsigned byte)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path}: IDX header truncated (rank {ndim})")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise UserError(
            f"{path}: truncated or padded IDX data: shape {shape} needs {expected} bytes "
            f"after the header, found {len(raw) - header}; re-download the file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise UserError(
        f"{root}: missing {stem}(.gz); expected the four Fashion-MNIST IDX files there "
        "(apt-get install dataset-fashion-mnist, or pass --data-dir)"
    )


def read_fashion_mnist(root: Path) -> RawArrays:
    """Read the four IDX files under ``root`` (Debian's dataset-fashion-mnist layout)."""
    if not root.is_dir():
        raise UserError(
            f"{root}: dataset folder not found; install it with "
            "'apt-get install dataset-fashion-mnist' or pass --data-dir"
        )
    arrays = {key: read_idx(_find(root, stem)) for key, stem in _FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise UserError(
                f"{root}: {split} images {images.shape} and labels {labels.shape} do not "
                "match; expected [N, 28, 28] images and N labels"
            )
        if labels.max(initial=0) >= len(FASHION_CLASSES):
            raise UserError(f"{root}: {split} labels go past class 9; not Fashion-MNIST")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.copy()).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return RawArrays(
        images(arrays["train_images"]), labels(arrays["train_labels"]),
        images(arrays["test_images"]), labels(arrays["test_labels"]),
        list(FASHION_CLASSES),
    )
