"""Tight packing of small unsigned integers (codebook indices) into a little-endian bit stream."""

from __future__ import annotations

import numpy as np

__all__ = ["pack_bits", "unpack_bits"]

_CHUNK = 1 << 20  # values per bit-packing chunk: a multiple of 8, so chunks end on bytes


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack integers below ``2**bits`` tightly: ``ceil(n * bits / 8)`` bytes.

    Value i's bit j goes to bit ``i * bits + j`` of one little-endian bit stream (so at 4
    bits a byte is ``v0 | v1 << 4``; at 3 bits values straddle bytes).

    Args:
        values: unsigned integers (any shape; row-major order is kept).
        bits: 1 to 8.

    Returns:
        The packed bytes.

    Raises:
        ValueError: ``bits`` out of range or a value too wide for it.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1 to 8, got {bits}")
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) to pack in {bits} bits")
    flat = flat.astype(np.uint8, copy=False)
    if bits == 8:
        return flat.tobytes()
    out = []
    # Chunked so the one-byte-per-bit intermediate stays small for 25M-weight models.
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        planes = np.unpackbits(chunk[:, None], axis=1, bitorder="little")[:, :bits]
        out.append(np.packbits(planes.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def unpack_bits(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` uint8 values from their packed bytes.

    Raises:
        ValueError: ``bits`` out of range or ``data`` not ``ceil(count * bits / 8)`` bytes.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1 to 8, got {bits}")
    need = (count * bits + 7) // 8
    if len(data) != need:
        raise ValueError(f"{count} values of {bits} bits take {need} bytes, got {len(data)}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return buf.copy()
    out = np.empty(count, dtype=np.uint8)
    for start in range(0, count, _CHUNK):
        m = min(_CHUNK, count - start)
        first = start * bits // 8  # exact: start is a multiple of 8
        planes = np.unpackbits(buf[first : first + (m * bits + 7) // 8], count=m * bits,
                               bitorder="little").reshape(m, bits)
        out[start : start + m] = np.packbits(planes, axis=1, bitorder="little").reshape(m)
    return out
