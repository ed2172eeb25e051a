"""Reading packed files (the format is described in ``netshrink.store.packed``): every
length and place is checked, so a truncated or damaged file is an error, never a wrong
tensor."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import Tensor

from netshrink.errors import UserError
from netshrink.store.bitpack import unpack_bits
from netshrink.store.packed_codec import (
    _DTYPES,
    ENCODINGS,
    FORMAT,
    MAGIC,
    VERSION,
    _CorruptError,
    _DType,
    _unshuffle,
    dequantize_int8,
)

__all__ = ["load_packed"]


@dataclass
class _File:
    path: Path
    header: dict[str, Any]
    blobs: memoryview

    def part(self, where: Any) -> memoryview:
        if (not isinstance(where, list) or len(where) != 2
                or not all(isinstance(v, int) and v >= 0 for v in where)
                or where[0] + where[1] > len(self.blobs)):
            raise _CorruptError(f"a part's place {where!r} lies outside the data")
        return self.blobs[where[0] : where[0] + where[1]]


def _open(path: Path, kind: str) -> _File:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: packed model file not found; check the path")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        if data[:4] == MAGIC[:4]:
            raise UserError(f"{path}: packed format {data[:5].decode(errors='replace')!r} is "
                            f"newer than this netshrink reads ({MAGIC[:5].decode()}); "
                            "upgrade netshrink")
        raise UserError(f"{path}: not a netshrink packed file (it does not start with "
                        f"{MAGIC!r}); pass a file written by pack_model, save_packed or "
                        "pack_onnx")
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        payload = decompressor.decompress(data[len(MAGIC) :])
    except zstandard.ZstdError as exc:
        raise UserError(f"{path}: corrupt packed file ({exc}); write it again") from None
    if not decompressor.eof:
        raise UserError(f"{path}: truncated packed file (the compressed data ends early); "
                        "write it again")
    if decompressor.unused_data:
        raise UserError(f"{path}: corrupt packed file ({len(decompressor.unused_data)} bytes "
                        "after the end of the data); write it again")
    try:
        size = int.from_bytes(payload[:8], "little")
        if len(payload) < 8 or size > len(payload) - 8:
            raise _CorruptError("the header is longer than the data")
        header = json.loads(payload[8 : 8 + size])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise _CorruptError("no netshrink.packed header")
    except (_CorruptError, ValueError) as exc:
        raise UserError(f"{path}: corrupt packed file ({exc}); write it again") from None
    version = header.get("version")
    if version != VERSION:
        raise UserError(f"{path}: packed format version {version!r}; this netshrink reads "
                        f"version {VERSION}; upgrade netshrink")
    if header.get("kind") != kind:
        names = {"state_dict": "model state dict", "onnx": "ONNX model"}
        use = {"state_dict": "load_packed or load_packed_model", "onnx": "unpack_onnx"}
        found = header.get("kind")
        if found not in names:
            raise UserError(f"{path}: packed content of kind {found!r}, which this netshrink "
                            "does not know; upgrade netshrink")
        raise UserError(f"{path}: holds a packed {names[found]}, not a packed "
                        f"{names[kind]}; read it with {use[found]}")
    return _File(path, header, memoryview(payload)[8 + size :])


def _check_sizes(f: _File) -> None:
    """The parts must tile the data exactly: a length that disagrees means corruption."""
    places = [w for e in f.header.get("tensors", []) if isinstance(e, dict)
              for w in (e.get("parts") or {}).values()]
    if "graph" in f.header:
        places.append(f.header["graph"])
    for where in places:
        f.part(where)  # each inside the data
    if sum(w[1] for w in places) != len(f.blobs):
        raise _CorruptError(f"the header accounts for {sum(w[1] for w in places)} bytes of data, "
                       f"the file holds {len(f.blobs)}")


def _shape(entry: dict[str, Any]) -> tuple[list[int], int]:
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _CorruptError(f"bad shape {shape!r}")
    return shape, math.prod(shape)


def _mask(f: _File, parts: dict[str, Any], n: int) -> np.ndarray | None:
    if "mask" not in parts:
        return None
    data = f.part(parts["mask"])
    if len(data) != (n + 7) // 8:
        raise _CorruptError(f"a mask of {len(data)} bytes for {n} elements")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n,
                         bitorder="little").astype(bool)


def _plain_words(f: _File, parts: dict[str, Any], dt: _DType, n: int,
                 sparse: bool) -> np.ndarray:
    """Decode ``dense``/``sparse`` element bytes into unsigned words."""
    values = f.part(parts["values"])
    mask = _mask(f, parts, n) if sparse else None
    count = n if mask is None else int(mask.sum())
    if sparse and mask is None:
        raise _CorruptError("a sparse tensor without a mask")
    if len(values) != count * dt.itemsize:
        raise _CorruptError(f"{len(values)} bytes of values for {count} elements of "
                       f"{dt.itemsize} bytes")
    words = _unshuffle(values, dt.itemsize)
    if mask is None:
        return words
    out = np.zeros(n, dtype=f"<u{dt.itemsize}")
    out[mask] = words
    return out


def _to_tensor(words: np.ndarray, dt: _DType, shape: list[int]) -> Tensor:
    raw = torch.from_numpy(np.ascontiguousarray(words).view(np.uint8))
    return raw.view(dt.torch).reshape(shape)


def _decode(f: _File, entry: dict[str, Any]) -> Tensor:
    dt = _DTYPES.get(entry["dtype"])
    if dt is None:
        raise _CorruptError(f"unknown dtype {entry['dtype']!r}")
    shape, n = _shape(entry)
    parts = entry["parts"]
    encoding = entry["encoding"]
    if encoding in ("dense", "sparse"):
        return _to_tensor(_plain_words(f, parts, dt, n, encoding == "sparse"), dt, shape)
    if encoding == "codebook":
        if not dt.is_float:
            raise _CorruptError(f"a codebook for a {entry['dtype']} tensor")
        raw_centroids = f.part(parts["centroids"])
        if len(raw_centroids) % 4 or len(raw_centroids) > 4 * 256:
            raise _CorruptError(f"{len(raw_centroids)} bytes of centroids")
        centroids = torch.from_numpy(np.frombuffer(raw_centroids, dtype="<f4").copy())
        mask = _mask(f, parts, n)
        count = n if mask is None else int(mask.sum())
        bits = entry["bits"]
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise _CorruptError(f"bits {bits!r}")
        ids = unpack_bits(f.part(parts["indices"]), bits, count)
        if count and int(ids.max()) >= len(centroids):
            raise _CorruptError(f"an index beyond the {len(centroids)} centroids")
        values = torch.zeros(n, dtype=torch.float32)
        chosen = centroids[torch.from_numpy(ids).long()]
        if mask is None:
            values = chosen
        else:
            values[torch.from_numpy(mask)] = chosen
        return values.reshape(shape).to(dt.torch)
    if encoding == "int8":
        q = _to_tensor(_plain_words(f, parts, _DTYPES["int8"], n, "mask" in parts),
                       _DTYPES["int8"], shape)
        scale = torch.from_numpy(np.frombuffer(f.part(parts["scale"]), dtype="<f4").copy())
        zero_point = None
        if "zero_point" in parts:
            zero_point = torch.from_numpy(
                np.frombuffer(f.part(parts["zero_point"]), dtype="<i4").copy())
        return dequantize_int8(q, scale, zero_point).to(dt.torch)
    raise UserError(f"{f.path}: tensor {entry.get('name')!r} uses encoding {encoding!r}, "
                    f"which this netshrink does not know ({', '.join(ENCODINGS)}); "
                    "upgrade netshrink")


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    f = _open(path, "state_dict")
    tensors: dict[str, Tensor] = {}
    try:
        _check_sizes(f)
        for entry in f.header["tensors"]:
            name = entry["name"]
            if not isinstance(name, str) or name in tensors:
                raise _CorruptError(f"tensor name {name!r} missing or repeated")
            tensors[name] = _decode(f, entry)
    except (_CorruptError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{f.path}: corrupt packed file ({type(exc).__name__}: {exc}); "
                        "write it again") from None
    return tensors, f.header


def load_packed(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read the tensors and metadata of a file ``save_packed`` or ``pack_model`` wrote.

    Codebook tensors come back as ``centroids[indices]`` (zeros where pruned) and int8
    tensors as ``dequantize_int8(q, scale, zero_point)``, both cast to their recorded
    dtype: exactly the tensors that were packed (zeros as +0.0).

    Args:
        path: the packed file.

    Returns:
        ``(tensors by name on the CPU, the meta dict given when saving)``.

    Raises:
        UserError: a missing file, not a packed file, truncated or corrupt data, or an
            encoding or version this netshrink does not know.
    """
    tensors, header = _read_tensors(path)
    meta = header.get("meta") or {}
    return tensors, meta


