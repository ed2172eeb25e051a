"""Fashion-MNIST (and MNIST) in the IDX format, gzipped or not.

IDX: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
each dimension as a big-endian int32, then the data. We check every one of these and the
byte count, so a truncated or wrong file is named with what was expected.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from netshrink.data.base import RawArrays
from netshrink.data.bounds import max_idx_bytes, raise_hint
from netshrink.errors import UserError
from netshrink.limits import element_count, open_regular

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
_DIMS: dict[str, tuple[int | None, ...]] = {
    "train_images": (None, 28, 28), "train_labels": (None,),
    "test_images": (None, 28, 28), "test_labels": (None,),
}


_MAX_RANK = 16
_REDOWNLOAD = "re-download the file"
# Deflate expands a byte to at most about 1,032 (zlib's own figure for its best case);
# a gzip file declaring more than this times its size cannot hold it, and is refused
# before anything is inflated.
_MAX_DEFLATE_RATIO = 1032
_READ_CHUNK = 1 << 20


class _Gunzip:
    """Reads a gzip stream's decompressed bytes into a buffer, never more than asked for.

    ``gzip.decompress`` would inflate a bomb whole before anything could be checked;
    ``readinto`` fills at most the buffer it is given, inflating in steps of at most
    ``_READ_CHUNK`` bytes, so the IDX header decides how much is ever decompressed.
    Concatenated members are read on; zero padding after the last one is ignored, other
    trailing bytes are an error.
    """

    def __init__(self, data: bytes | memoryview) -> None:
        self._rest = data
        self._member = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._done = False

    def read(self, n: int) -> bytes:
        buffer = bytearray(n)
        return bytes(buffer[: self.readinto(buffer)])

    def readinto(self, buffer: bytearray) -> int:
        """Fill ``buffer`` from the stream; the number of bytes put there (fewer at its end)."""
        view = memoryview(buffer)
        have = 0
        while have < len(view) and not self._done:
            before = len(self._rest)
            chunk = self._member.decompress(self._rest, min(len(view) - have, _READ_CHUNK))
            self._rest = self._member.unconsumed_tail
            view[have : have + len(chunk)] = chunk
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
        return have


class _Plain:
    """The same reads from an uncompressed file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def read(self, n: int) -> bytes:
        return self._f.read(n)

    def readinto(self, buffer: bytearray) -> int:
        view = memoryview(buffer)
        have = 0
        while have < len(view):
            got = self._f.readinto(view[have:])
            if not got:
                break
            have += got
        return have


def read_idx(path: Path, *, dims: tuple[int | None, ...] | None = None) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) into a uint8 array.

    The header is checked before any of the data is read or inflated: the type, the rank,
    the dimensions (against ``dims`` when given: None where any size goes), and the bytes
    they declare (at most ``NETSHRINK_MAX_IDX_BYTES``, and no more than a plain file
    holds or a gzip file could inflate to). The data is then read or inflated into one
    buffer of exactly that size, plus a few bytes to tell a padded file: a gzip bomb is
    never inflated past what the header declares.

    Raises:
        UserError: the file is missing, not a regular file, truncated, padded, too large,
            not an unsigned-byte IDX file, or of other dimensions than ``dims``.
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    limit = max_idx_bytes()
    with open_regular(path, "IDX file") as f:
        size = os.fstat(f.fileno()).st_size
        # Deflate never grows data by more than 0.1% and a few headers: a gzip file
        # larger than that holds more than any IDX data netshrink reads.
        if gz and size > limit + limit // 1000 + (1 << 16):
            raise UserError(f"{path}: {size:,} bytes of gzip, more than IDX data of at most "
                            f"{limit:,} bytes compresses to; {_REDOWNLOAD}, or "
                            f"{raise_hint('NETSHRINK_MAX_IDX_BYTES')}")
        try:
            stream: _Gunzip | _Plain = _Gunzip(_read_all(f, path, size)) if gz else _Plain(f)
            shape, header = _header(stream, path, dims, limit)
            expected = math.prod(shape)
            if gz and expected > size * _MAX_DEFLATE_RATIO:
                raise UserError(f"{path}: truncated IDX data: shape {shape} needs "
                                f"{expected:,} bytes and a {size:,}-byte gzip file cannot "
                                f"hold that many; {_REDOWNLOAD}")
            if not gz and size != header + expected:
                raise UserError(_size_error(path, shape, expected, size - header, ""))
            body = bytearray(expected)
            found = stream.readinto(body) + len(stream.read(16))
        except (zlib.error, EOFError) as exc:
            raise UserError(f"{path}: not a readable gzip file ({exc}); {_REDOWNLOAD}") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot read the IDX file ({exc.strerror or exc})") from None
    if found != expected:
        raise UserError(_size_error(path, shape, expected, found,
                                    "+" if gz and found > expected else ""))
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _read_all(f: BinaryIO, path: Path, size: int) -> bytes:
    """A gzip file's compressed bytes (``open_regular`` bounded its size)."""
    data = f.read(size + 1)
    if len(data) > size:
        raise UserError(f"{path}: the file grew while being read; {_REDOWNLOAD}")
    return data


def _header(stream: _Gunzip | _Plain, path: Path, dims: tuple[int | None, ...] | None,
            limit: int) -> tuple[tuple[int, ...], int]:
    """The shape an IDX header declares and the header's length, once checked."""
    head = stream.read(4)
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
    dims_raw = stream.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise UserError(f"{path}: IDX header truncated (rank {ndim}); {_REDOWNLOAD}")
    shape = struct.unpack(f">{ndim}i", dims_raw)
    try:
        element_count(shape, available=1 << 62)  # dimensions >= 0 (sizes come next)
    except ValueError as exc:
        raise UserError(f"{path}: impossible IDX header: {exc}; {_REDOWNLOAD}") from None
    if math.prod(shape) > limit:
        raise UserError(f"{path}: impossible IDX header: shape {list(shape)[:8]} declares "
                        f"{math.prod(shape):,} bytes of data, more than the {limit:,} "
                        f"netshrink reads from one IDX file; {_REDOWNLOAD}, or "
                        f"{raise_hint('NETSHRINK_MAX_IDX_BYTES')}")
    if dims is not None and (len(shape) != len(dims) or any(
            want is not None and got != want for got, want in zip(shape, dims, strict=False))):
        wanted = "[" + ", ".join("N" if d is None else str(d) for d in dims) + "]"
        raise UserError(f"{path}: IDX data of shape {list(shape)[:8]}, expected {wanted}; "
                        f"{_REDOWNLOAD}")
    return shape, 4 + 4 * ndim


def _size_error(path: Path, shape: tuple[int, ...], expected: int, found: int,
                more: str) -> str:
    return (f"{path}: truncated or padded IDX data: shape {shape} needs {expected:,} bytes "
            f"after the header, found {found:,}{more}; {_REDOWNLOAD}")


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
    # The shapes are checked from each header, before its data is read or inflated.
    arrays = {key: read_idx(_find(root, stem), dims=_DIMS[key]) for key, stem in _FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise UserError(
                f"{root}: {split} images {images.shape} and labels {labels.shape} do not "
                "match; expected [N, 28, 28] images and N labels"
            )
        if labels.max(initial=0) >= len(FASHION_CLASSES):
            raise UserError(f"{root}: {split} labels go past class 9; not Fashion-MNIST")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).unsqueeze(1)  # read_idx's own buffer: no copy

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return RawArrays(
        images(arrays["train_images"]), labels(arrays["train_labels"]),
        images(arrays["test_images"]), labels(arrays["test_labels"]),
        list(FASHION_CLASSES),
    )
