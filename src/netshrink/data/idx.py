"""Fashion-MNIST (and MNIST) in the IDX format, gzipped or not.

IDX: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
each dimension as a big-endian int32, then the data. We check every one of these and the
byte count, so a truncated or wrong file is named with what was expected.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from netshrink.data.base import RawArrays
from netshrink.errors import UserError
from netshrink.limits import element_count, read_regular

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


MAX_IDX_BYTES = 2 << 30  # data bytes one IDX file may declare (Fashion-MNIST's: 47 MB)
_MAX_RANK = 16
_REDOWNLOAD = "re-download the file"


class _Gunzip:
    """Reads a gzip stream's decompressed bytes, never more than asked for.

    ``gzip.decompress`` would inflate a bomb whole before anything could be checked;
    this hands out at most ``n`` bytes per ``read`` (plus one zlib block of slack), so
    the IDX header decides how much is ever decompressed. Concatenated members are read
    on; zero padding after the last one is ignored, other trailing bytes are an error.
    """

    def __init__(self, data: bytes) -> None:
        self._rest = data
        self._member = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""
        self._done = False

    def read(self, n: int) -> bytes:
        out = [self._pending[:n]]
        self._pending = self._pending[n:]
        have = len(out[0])
        while have < n and not self._done:
            before = len(self._rest)
            chunk = self._member.decompress(self._rest, n - have)
            self._rest = self._member.unconsumed_tail
            out.append(chunk)
            have += len(chunk)
            if self._member.eof:
                rest = self._member.unused_data
                if not rest.strip(b"\0"):
                    self._done = True
                elif rest[:2] == b"\x1f\x8b":
                    self._member = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self._rest = rest
                else:
                    raise zlib.error(f"{len(rest)} bytes of something else after the data")
            elif not chunk and (not self._rest or len(self._rest) == before):
                raise EOFError("the compressed data ends early")
        return b"".join(out)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) into a uint8 array.

    Nothing is allocated or decompressed beyond what the header declares (and at most
    ``MAX_IDX_BYTES``): a plain file's size is checked against it first, a gzipped one
    is inflated only that far, plus a few bytes to tell a padded file.

    Raises:
        UserError: the file is missing, not a regular file, truncated, padded, or not an
            unsigned-byte IDX file.
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    raw = read_regular(path, "IDX file", max_bytes=MAX_IDX_BYTES + (1 << 16))
    try:
        if gz:
            stream = _Gunzip(raw)
            head = stream.read(4)
        else:
            head = raw[:4]
        if len(head) < 4 or head[0] != 0 or head[1] != 0:
            raise UserError(f"{path}: not an IDX file (expected magic 0x0000 then type and "
                            f"rank); {_REDOWNLOAD}")
        dtype_code, ndim = head[2], head[3]
        if dtype_code != 0x08:
            raise UserError(f"{path}: IDX type 0x{dtype_code:02x}; expected 0x08 "
                            "(unsigned byte)")
        if not 1 <= ndim <= _MAX_RANK:
            raise UserError(f"{path}: IDX rank {ndim}; expected 1 to {_MAX_RANK} dimensions; "
                            f"{_REDOWNLOAD}")
        header = 4 + 4 * ndim
        dims_raw = stream.read(4 * ndim) if gz else raw[4:header]
        if len(dims_raw) < 4 * ndim:
            raise UserError(f"{path}: IDX header truncated (rank {ndim}); {_REDOWNLOAD}")
        shape = struct.unpack(f">{ndim}i", dims_raw)
        try:
            expected = element_count(shape, available=MAX_IDX_BYTES)
        except ValueError as exc:
            raise UserError(f"{path}: impossible IDX header: {exc} (an IDX file holds at "
                            f"most {MAX_IDX_BYTES:,} bytes); {_REDOWNLOAD}") from None
        if gz:
            body = stream.read(expected)
            found = len(body) + len(stream.read(16))
        else:
            body = memoryview(raw)[header : header + expected]  # a view: no copy
            found = len(raw) - header
    except (zlib.error, EOFError) as exc:
        raise UserError(f"{path}: not a readable gzip file ({exc}); {_REDOWNLOAD}") from None
    if found != expected:
        more = "+" if gz and found > expected else ""
        raise UserError(
            f"{path}: truncated or padded IDX data: shape {shape} needs {expected:,} bytes "
            f"after the header, found {found:,}{more}; {_REDOWNLOAD}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        # exists(), not is_file(): a pipe or folder by that name is reported as what it
        # is (read_idx refuses anything but a regular file), not as a missing file.
        if (root / name).exists():
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
