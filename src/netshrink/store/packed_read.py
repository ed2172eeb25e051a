"""Reading packed files (the format is described in ``netshrink.store.packed``): every
length and place is checked, so a truncated or damaged file is an error, never a wrong
tensor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import Tensor

from netshrink.errors import UserError
from netshrink.limits import bounded_json, element_count, read_regular
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


# A packed file is read whole, and its content is decompressed whole: both are bounded.
MAX_PACKED_FILE_BYTES = 2 << 30
MAX_CONTENT_BYTES = 4 << 30  # what the zstd frame may say it holds, whatever the file
# zstd packs noise-like weights 1-3x; a frame that claims more than RATIO times its own
# size (beyond a floor for small files) is a decompression bomb, not a model.
MAX_RATIO = 1000
RATIO_FLOOR = 64 << 20
MAX_HEADER_BYTES = 64 << 20
_REWRITE = "write it again (pack_model, save_packed or pack_onnx)"


def _content_limit(compressed: int) -> int:
    return min(MAX_CONTENT_BYTES, max(RATIO_FLOOR, MAX_RATIO * compressed))


def _read_exact(reader: Any, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = reader.read(min(n, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _open(path: Path, kind: str) -> _File:
    """Read, check and decompress a packed file, allocating only what its header justifies.

    The zstd frame must declare its content size; that size must be within
    ``_content_limit`` of the file's size and equal what the header accounts for (which
    ``_plan`` bounds by every tensor's shape and dtype) before the frame is decompressed.
    """
    path = Path(path)
    data = read_regular(path, "packed model file", max_bytes=MAX_PACKED_FILE_BYTES)
    if not data.startswith(MAGIC):
        if data[:4] == MAGIC[:4]:
            raise UserError(f"{path}: packed format {data[:5].decode(errors='replace')!r} is "
                            f"newer than this netshrink reads ({MAGIC[:5].decode()}); "
                            "upgrade netshrink")
        raise UserError(f"{path}: not a netshrink packed file (it does not start with "
                        f"{MAGIC!r}); pass a file written by pack_model, save_packed or "
                        "pack_onnx")
    frame = memoryview(data)[len(MAGIC) :]
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise UserError(f"{path}: corrupt packed file ({exc}); {_REWRITE}") from None
    if declared < 0:
        raise UserError(f"{path}: the packed file's compressed data does not declare its "
                        f"size, so it cannot be read safely; {_REWRITE} with this netshrink")
    limit = _content_limit(len(frame))
    if declared > limit:
        raise UserError(f"{path}: corrupt packed file: {len(frame):,} compressed bytes claim "
                        f"to hold {declared:,}, more than the {limit:,} a packed file of "
                        f"this size may; {_REWRITE}")
    if declared < 8:
        raise UserError(f"{path}: truncated packed file (no header); {_REWRITE}")
    dctx = zstandard.ZstdDecompressor()
    try:
        # Only the header first: what it says bounds the rest before it is decompressed.
        with dctx.stream_reader(frame, read_across_frames=False) as reader:
            size = int.from_bytes(_read_exact(reader, 8), "little")
            if size > min(MAX_HEADER_BYTES, declared - 8):
                raise _CorruptError(f"the header claims {size:,} bytes")
            raw_header = _read_exact(reader, size)
        if len(raw_header) != size:
            raise _CorruptError("the data ends inside the header")
        header = bounded_json(raw_header, max_bytes=MAX_HEADER_BYTES)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise _CorruptError("no netshrink.packed header")
    except (_CorruptError, ValueError, zstandard.ZstdError) as exc:
        raise UserError(f"{path}: corrupt packed file ({exc}); {_REWRITE}") from None
    _check_header(path, header, kind)
    try:
        blob_bytes = _plan(header)
    except (_CorruptError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: corrupt packed file ({type(exc).__name__}: {exc}); "
                        f"{_REWRITE}") from None
    if 8 + size + blob_bytes != declared:
        where = "parts lie outside the data: " if 8 + size + blob_bytes > declared else ""
        raise UserError(f"{path}: corrupt packed file ({where}the header accounts for "
                        f"{8 + size + blob_bytes:,} bytes, the data declares {declared:,}); "
                        f"{_REWRITE}")
    decompressor = dctx.decompressobj()
    try:
        payload = decompressor.decompress(frame)
    except zstandard.ZstdError as exc:
        raise UserError(f"{path}: corrupt packed file ({exc}); {_REWRITE}") from None
    if not decompressor.eof:
        raise UserError(f"{path}: truncated packed file (the compressed data ends early); "
                        f"{_REWRITE}")
    if decompressor.unused_data:
        raise UserError(f"{path}: corrupt packed file ({len(decompressor.unused_data)} bytes "
                        f"after the end of the data); {_REWRITE}")
    if len(payload) != declared:
        raise UserError(f"{path}: corrupt packed file ({len(payload):,} bytes of data, "
                        f"{declared:,} declared); {_REWRITE}")
    return _File(path, header, memoryview(payload)[8 + size :])


def _check_header(path: Path, header: dict[str, Any], kind: str) -> None:
    version = header.get("version")
    if version != VERSION:
        shown = version if isinstance(version, int | str) and len(str(version)) < 40 \
            else type(version).__name__
        raise UserError(f"{path}: packed format version {shown!r}; this netshrink reads "
                        f"version {VERSION}; upgrade netshrink")
    if header.get("kind") != kind:
        names = {"state_dict": "model state dict", "onnx": "ONNX model"}
        use = {"state_dict": "load_packed or load_packed_model", "onnx": "unpack_onnx"}
        found = header.get("kind")
        if not isinstance(found, str) or found not in names:
            shown = found[:40] if isinstance(found, str) else type(found).__name__
            raise UserError(f"{path}: packed content of kind {shown!r}, which this netshrink "
                            "does not know; upgrade netshrink")
        raise UserError(f"{path}: holds a packed {names[found]}, not a packed "
                        f"{names[kind]}; read it with {use[found]}")


def _places(header: dict[str, Any]) -> list[Any]:
    tensors = header.get("tensors", [])
    if not isinstance(tensors, list):
        raise _CorruptError("'tensors' is not a list")
    places = []
    for entry in tensors:
        if not isinstance(entry, dict) or not isinstance(entry.get("parts"), dict):
            raise _CorruptError("a tensor entry without parts")
        places.extend(entry["parts"].values())
    if "graph" in header:
        places.append(header["graph"])
    return places


def _plan(header: dict[str, Any]) -> int:
    """The bytes of data the header accounts for, each tensor's bounded by its shape.

    Every part is ``[offset, length]``; a tensor's parts together may not exceed what its
    encoding could need for its element count (so a header cannot justify a larger frame
    than its tensors), and the decoded tensors together at most ``MAX_CONTENT_BYTES``.
    """
    decoded = 0
    for entry in header.get("tensors", []) if isinstance(header.get("tensors"), list) else []:
        if not isinstance(entry, dict):
            raise _CorruptError("a tensor entry is not an object")
        dt = _DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
        if dt is None:
            raise _CorruptError(f"unknown dtype {_short(entry.get('dtype'))}")
        n = _count(entry.get("shape"), dt.itemsize, MAX_CONTENT_BYTES - decoded)
        decoded += n * dt.itemsize
        parts = entry.get("parts")
        if not isinstance(parts, dict):
            raise _CorruptError("a tensor entry without parts")
        need = 0
        for where in parts.values():
            if (not isinstance(where, list) or len(where) != 2
                    or not all(_is_count(v) for v in where)):
                raise _CorruptError(f"a part's place {_short(where)} is not [offset, length]")
            need += where[1]
        # dense/sparse/int8 values, a mask, int8 scales and zero points, 256 centroids.
        bound = n * dt.itemsize + (n + 7) // 8 + 8 * n + 4 * 256 + 64
        if need > bound:
            raise _CorruptError(f"tensor {_short(entry.get('name'))} of {n} elements has "
                                f"{need:,} bytes of parts")
    return sum(w[1] for w in _places(header) if isinstance(w, list) and len(w) == 2
               and all(_is_count(v) for v in w))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, int | str | None) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _count(shape: Any, itemsize: int, available: int) -> int:
    try:
        return element_count(shape, itemsize=itemsize, available=max(0, available))
    except ValueError as exc:
        raise _CorruptError(str(exc)) from None


def _check_sizes(f: _File) -> None:
    """The parts must tile the data exactly: a length that disagrees means corruption."""
    places = _places(f.header)
    for where in places:
        f.part(where)  # each inside the data
    if sum(w[1] for w in places) != len(f.blobs):
        raise _CorruptError(f"the header accounts for {sum(w[1] for w in places)} bytes of data, "
                       f"the file holds {len(f.blobs)}")


def _shape(entry: dict[str, Any]) -> tuple[list[int], int]:
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _CorruptError(f"bad shape {_short(shape)}")
    return shape, _count(shape, 1, MAX_CONTENT_BYTES)


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
    raise UserError(f"{f.path}: tensor {_short(entry.get('name'))} uses encoding "
                    f"{_short(encoding)}, "
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
                raise _CorruptError(f"tensor name {_short(name)} missing or repeated")
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
    if not isinstance(meta, dict):
        raise UserError(f"{path}: corrupt packed file (its meta is not a JSON object); "
                        f"{_REWRITE}")
    return tensors, meta


