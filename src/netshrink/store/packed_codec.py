"""Packed files' element coding, shared by the writer (``packed``) and the reader
(``packed_read``): format constants, dtypes, zero masks, byte shuffling, int8 dequantizing.
The format itself is described in ``netshrink.store.packed``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from netshrink.errors import UserError

MAGIC = b"NSPK1\n"
FORMAT = "netshrink.packed"
VERSION = 1
ENCODINGS = ("dense", "sparse", "codebook", "int8")

# ``(q, scale)`` or ``(q, scale, zero_point)``; see ``dequantize_int8``.
Int8Weight = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]

@dataclass(frozen=True)
class _DType:
    torch: torch.dtype
    itemsize: int
    is_float: bool


_DTYPES: dict[str, _DType] = {
    "float32": _DType(torch.float32, 4, True),
    "float64": _DType(torch.float64, 8, True),
    "float16": _DType(torch.float16, 2, True),
    "bfloat16": _DType(torch.bfloat16, 2, True),
    "int8": _DType(torch.int8, 1, False),
    "uint8": _DType(torch.uint8, 1, False),
    "int16": _DType(torch.int16, 2, False),
    "int32": _DType(torch.int32, 4, False),
    "int64": _DType(torch.int64, 8, False),
    "uint16": _DType(torch.uint16, 2, False),
    "uint32": _DType(torch.uint32, 4, False),
    "uint64": _DType(torch.uint64, 8, False),
    "bool": _DType(torch.bool, 1, False),
}
_NAMES = {dt.torch: name for name, dt in _DTYPES.items()}


class _CorruptError(Exception):
    """Inside the reader: the file's content does not add up; becomes a UserError."""


# ------------------------------------------------------------------------ element coding


def _words(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """Raw element bytes seen as unsigned integers of the element's width."""
    return raw.view(np.dtype(f"<u{itemsize}"))


def _nonzero(words: np.ndarray, dt: _DType) -> np.ndarray:
    if dt.is_float:
        # Every bit but the sign: -0.0 counts as zero too (see the module docstring).
        magnitude = np.array((1 << (8 * dt.itemsize - 1)) - 1, dtype=words.dtype)
        return (words & magnitude) != 0
    return words != 0


def _mask_bytes(mask: np.ndarray) -> bytes:
    return np.packbits(mask.reshape(-1), bitorder="little").tobytes()


def _plain_parts(raw: np.ndarray, dt: _DType) -> tuple[str, dict[str, bytes]]:
    """``dense`` or ``sparse``, whichever is smaller, for raw element bytes."""
    words = _words(raw, dt.itemsize)
    mask = _nonzero(words, dt)
    nnz = int(mask.sum())
    n = words.size
    if (n + 7) // 8 + nnz * dt.itemsize < n * dt.itemsize:
        return "sparse", {"mask": _mask_bytes(mask), "values": _shuffle(words[mask])}
    return "dense", {"values": _shuffle(words)}


def _shuffle(words: np.ndarray) -> bytes:
    """Element bytes as byte planes: every element's first byte, then every second byte...

    Blosc's "shuffle": the sign/exponent bytes of float weights vary little and compress,
    the low mantissa bytes are noise and do not; interleaved, zstd finds neither. It makes
    a pruned ResNet-18's values about 9% smaller than zstd alone.
    """
    return words.view(np.uint8).reshape(-1, words.dtype.itemsize).T.tobytes()


def _unshuffle(data: memoryview, itemsize: int) -> np.ndarray:
    planes = np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1)
    # np.array copies: the planes are a read-only view of the file's bytes.
    return np.array(planes.T, order="C").view(f"<u{itemsize}").reshape(-1)


def _tensor_bytes(t: Tensor) -> np.ndarray:
    """A tensor's row-major element bytes (any dtype, bfloat16 and bool included)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _dtype_name(t: Tensor, name: str) -> str:
    found = _NAMES.get(t.dtype)
    if found is None:
        raise UserError(f"tensor {name!r} has dtype {t.dtype}, which packed files do not "
                        f"store; convert it to one of {', '.join(_DTYPES)}")
    return found


def dequantize_int8(q: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
    """``(q - zero_point) * scale`` in float32, the one formula packed files reload with.

    A model whose weights come from this function reloads from a packed file bit for bit.

    Args:
        q: int8 values; dimension 0 is the output channel.
        scale: one value, or one per output channel (``q.shape[0]``); cast to float32.
        zero_point: None (symmetric), or integers shaped like ``scale``.

    Returns:
        float32 tensor shaped like ``q``: ``q.float()`` minus ``zero_point.float()``
        (when given), times ``scale`` broadcast along dimension 0.

    Raises:
        ValueError: ``scale`` or ``zero_point`` has neither 1 nor ``q.shape[0]`` values.
    """

    def per_channel(t: Tensor, what: str) -> Tensor:
        t = t.detach().to(device=q.device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            return t.reshape(())
        if q.ndim == 0 or t.numel() != q.shape[0]:
            raise ValueError(f"{what} has {t.numel()} values; expected 1 or one per output "
                             f"channel ({q.shape[0] if q.ndim else 1})")
        return t.reshape(-1, *[1] * (q.ndim - 1))

    x = q.to(torch.float32)
    if zero_point is not None:
        x = x - per_channel(zero_point, "zero_point")
    return x * per_channel(scale, "scale")


