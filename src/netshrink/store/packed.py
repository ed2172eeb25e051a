"""Packed model files: sparse, quantized and codebook weights in a file that loads back.

A safetensors file stores every weight at full width, so pruning and weight sharing do
not make it smaller. A packed file does, and still reloads to the very same tensors. It
holds no pickle, and nothing in it is ever executed.

Layout (all integers little-endian)::

    b"NSPK1\\n"                       magic; the digit is the major format version
    one zstd frame (with checksum) of:
        u64   header length H
        H     JSON header: {"format": "netshrink.packed", "version": 1,
                            "kind": "state_dict" | "onnx", "meta": {...}, "spec": {...},
                            "tensors": [entry, ...], ("graph": [offset, length])}
        ...   the blobs, back to back; offsets are counted from the first blob

Each tensor entry has ``name``, ``dtype``, ``shape``, ``encoding`` and ``parts`` (part
name -> ``[offset, length]``). Encodings:

``dense``
    part ``values``: the elements' bytes, row-major and byte-shuffled (all elements'
    first bytes, then all second bytes, ...; ``_shuffle``).
``sparse``
    part ``mask``: one bit per element, 1 = non-zero (``numpy.packbits``, little bit
    order, row-major); part ``values``: the non-zero elements, row-major, byte-shuffled.
    Chosen automatically whenever it is smaller than ``dense``.
``codebook``
    part ``centroids``: float32 ``[K]``, K <= 256; part ``indices``: each non-zero
    element's centroid index, ``bits`` wide (``bits`` in the entry) in one little-endian
    bit stream (value i's bit j is stream bit ``i * bits + j``; 4 bits: two per byte,
    low nibble first); part ``mask`` as for ``sparse``, present when the tensor has
    zeros. Reloads as ``centroids[indices]`` (zeros elsewhere) cast to ``dtype``.
``int8``
    part ``values``: int8 (all of them, or with a ``mask`` part only the non-zero ones);
    part ``scale``: float32, one per tensor or one per output channel (dimension 0);
    optional part ``zero_point``: int32, shaped like ``scale``. Reloads through
    ``dequantize_int8`` (float32), cast to ``dtype``.

"Zero" means value zero: for floats both +0.0 and -0.0 count (masking with ``mul_``
leaves -0.0 behind for pruned negative weights, and they must not cost space), and a zero
reloads as +0.0. Everything else reloads bit for bit: ``torch.equal`` holds for every
tensor, NaNs aside, and the model computes what it computed before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from pydantic import ValidationError
from torch import Tensor, nn

from netshrink.errors import UserError
from netshrink.models import ModelSpec
from netshrink.quant.kmeans import Codebook
from netshrink.store.atomic import atomic_writer
from netshrink.store.bitpack import pack_bits, unpack_bits
from netshrink.store.checkpoint import model_from_state

__all__ = [
    "FORMAT",
    "MAGIC",
    "VERSION",
    "Int8Weight",
    "dequantize_int8",
    "load_packed",
    "load_packed_model",
    "pack_model",
    "save_packed",
]

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


# ---------------------------------------------------------------------------- the writer


class _Blobs:
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0

    def add(self, parts: Mapping[str, bytes]) -> dict[str, list[int]]:
        where = {}
        for part, data in parts.items():
            where[part] = [self.size, len(data)]
            self.pieces.append(data)
            self.size += len(data)
        return where


def _entry(name: str, t: Tensor, encoding: str, parts: dict[str, list[int]],
           **extra: Any) -> dict[str, Any]:
    return {"name": name, "dtype": _dtype_name(t, name), "shape": list(t.shape),
            "encoding": encoding, "parts": parts, **extra}


def _codebook_parts(name: str, t: Tensor, book: Codebook) -> tuple[dict[str, bytes], int]:
    if not t.dtype.is_floating_point:
        raise ValueError(f"codebook given for {name!r}, whose dtype {t.dtype} is not float")
    if book.indices.shape != t.shape or book.mask.shape != t.shape:
        raise ValueError(f"codebook for {name!r} is shaped {list(book.indices.shape)}, "
                         f"the tensor {list(t.shape)}")
    if len(book.centroids) > 256:
        raise ValueError(f"codebook for {name!r} has {len(book.centroids)} centroids; "
                         "at most 256 fit 8-bit indices")
    if not torch.equal(book.dense(t.dtype).cpu(), t.cpu()):
        raise ValueError(f"codebook for {name!r} does not reproduce the tensor (the weights "
                         "changed after kmeans_share without CodebookHook?); the file would "
                         "not reload the model")
    mask = book.mask.cpu().reshape(-1).numpy()
    ids = book.indices.cpu().reshape(-1).numpy()[mask]
    parts = {
        "centroids": book.centroids.detach().cpu().to(torch.float32).numpy().tobytes(),
        "indices": pack_bits(ids, book.bits),
    }
    if not mask.all():
        parts["mask"] = _mask_bytes(mask)
    return parts, book.bits


def _int8_parts(name: str, t: Tensor, quant: Int8Weight) -> dict[str, bytes]:
    q, scale, *rest = quant
    zero_point = rest[0] if rest else None
    if q.dtype != torch.int8 or q.shape != t.shape:
        raise ValueError(f"int8 weight for {name!r} must be an int8 tensor shaped "
                         f"{list(t.shape)}, got {q.dtype} {list(q.shape)}")
    if zero_point is not None and (zero_point.dtype.is_floating_point
                                   or zero_point.dtype == torch.bool):
        raise ValueError(f"zero_point for {name!r} must be integers, got {zero_point.dtype}")
    if not torch.equal(dequantize_int8(q, scale, zero_point).to(t.dtype).cpu(), t.cpu()):
        raise ValueError(f"int8 weight for {name!r} does not reproduce the tensor through "
                         "dequantize_int8; the file would not reload the model")
    # The encoding's name is not kept: a mask part, when there, says the values are sparse.
    _, parts = _plain_parts(_tensor_bytes(q), _DTYPES["int8"])
    parts["scale"] = scale.detach().cpu().to(torch.float32).reshape(-1).numpy().tobytes()
    if zero_point is not None:
        zp = zero_point.detach().cpu().reshape(-1)
        parts["zero_point"] = zp.to(torch.int32).numpy().tobytes()
    return parts


def _write(path: Path, header: dict[str, Any], blobs: _Blobs, level: int) -> int:
    head = json.dumps(header, separators=(",", ":")).encode()
    pieces: Iterable[bytes] = [len(head).to_bytes(8, "little"), head, *blobs.pieces]
    total = 8 + len(head) + blobs.size
    # The checksum lets a flipped bit be reported as corruption rather than loaded;
    # threads=-1 uses every core for the high levels, and the output stays one frame.
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=-1)
    compressor = cctx.compressobj(size=total)
    with atomic_writer(path) as handle:
        handle.write(MAGIC)
        for piece in pieces:
            handle.write(compressor.compress(piece))
        handle.write(compressor.flush())
    return path.stat().st_size


def save_packed(
    path: Path,
    tensors: Mapping[str, Tensor],
    *,
    codebooks: Mapping[str, Codebook] | None = None,
    int8: Mapping[str, Int8Weight] | None = None,
    meta: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    level: int = 3,
) -> int:
    """Write ``tensors`` to a packed file atomically, each in its smallest encoding.

    Tensors named in ``codebooks`` or ``int8`` are stored that way (after checking that
    the codebook or the int8 values reproduce the tensor exactly, so that the file
    reloads what was given); every other tensor is stored ``sparse`` when that is
    smaller than ``dense``.

    Args:
        path: the target file; replaced only once fully written.
        tensors: name -> tensor (a state dict); any dtype of ``_DTYPES``.
        codebooks: tensor name -> its ``Codebook`` (``kmeans_share`` names layers; add
            ``.weight``, or use ``pack_model``, which does).
        int8: tensor name -> ``(q, scale)`` or ``(q, scale, zero_point)`` such that
            ``dequantize_int8(q, scale, zero_point)`` is the tensor.
        meta: JSON-able facts kept with the tensors (class names, preprocessing).
        spec: JSON-able model spec (``ModelSpec.model_dump(mode="json")``) for
            ``load_packed_model``.
        level: zstd level (1-22). Weights are mostly float noise: on a 50%-pruned
            ResNet-18, level 19 packs 1% tighter than 3 and takes 40 times longer.

    Returns:
        The file's size in bytes.

    Raises:
        ValueError: a codebook or int8 entry for a missing tensor, or one that does not
            reproduce its tensor.
        UserError: a tensor of a dtype packed files do not store.
    """
    codebooks = dict(codebooks or {})
    int8 = dict(int8 or {})
    for key in [*codebooks, *int8]:
        if key not in tensors:
            raise ValueError(f"{key!r} is not one of the tensors to pack")
    both = set(codebooks) & set(int8)
    if both:
        raise ValueError(f"{sorted(both)[0]!r} has both a codebook and int8 values; pick one")
    blobs = _Blobs()
    entries = []
    for name, t in tensors.items():
        if name in codebooks:
            parts, bits = _codebook_parts(name, t, codebooks[name])
            entries.append(_entry(name, t, "codebook", blobs.add(parts), bits=bits))
        elif name in int8:
            entries.append(_entry(name, t, "int8", blobs.add(_int8_parts(name, t, int8[name]))))
        else:
            dt = _DTYPES[_dtype_name(t, name)]
            encoding, parts = _plain_parts(_tensor_bytes(t), dt)
            entries.append(_entry(name, t, encoding, blobs.add(parts)))
    header = {"format": FORMAT, "version": VERSION, "kind": "state_dict", "meta": meta or {},
              "spec": spec, "tensors": entries}
    return _write(Path(path), header, blobs, level)


# ---------------------------------------------------------------------------- the reader


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


# -------------------------------------------------------------------------------- models


def pack_model(
    model: nn.Module,
    spec: ModelSpec,
    path: Path,
    *,
    codebooks: Mapping[str, Codebook] | None = None,
    int8: Mapping[str, Int8Weight] | None = None,
    meta: dict[str, Any] | None = None,
    level: int = 3,
) -> int:
    """Pack ``model``'s state dict with its spec, so ``load_packed_model`` rebuilds it.

    Args:
        model: the model to store (parameters and buffers).
        spec: how to rebuild its structure (``pruned=True`` for channel-pruned widths).
        path: the target file; replaced only once fully written.
        codebooks: by layer name, as ``kmeans_share`` returned them (or by tensor name).
        int8: by layer or tensor name, ``(q, scale[, zero_point])``; see ``save_packed``.
        meta: JSON-able facts to keep with it (class names, preprocessing, provenance).
        level: zstd level.

    Returns:
        The file's size in bytes.

    Raises:
        ValueError: a codebook or int8 entry that names no weight or does not reproduce it.
        UserError: a tensor of a dtype packed files do not store.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    def by_tensor(given: Mapping[str, Any] | None) -> dict[str, Any]:
        # A layer name ("layer1.0.conv1") stands for its weight.
        return {k if k in tensors else f"{k}.weight": v for k, v in (given or {}).items()}

    return save_packed(path, tensors, codebooks=by_tensor(codebooks), int8=by_tensor(int8),
                       meta=meta, spec=spec.model_dump(mode="json"), level=level)


def load_packed_model(path: Path) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Rebuild a model from a file ``pack_model`` wrote.

    As ``netshrink.store.checkpoint.load_model`` does for safetensors files: a
    ``pruned`` spec builds the unpruned model and gives its layers the file's widths.

    Args:
        path: the packed file.

    Returns:
        ``(model in eval mode, its spec, the file's meta dict)``.

    Raises:
        UserError: an unreadable file (see ``load_packed``), one without a model spec,
            or weights that do not fit the spec.
    """
    tensors, header = _read_tensors(path)
    raw_spec = header.get("spec")
    if raw_spec is None:
        raise UserError(f"{path}: the packed file holds tensors but no model spec (it was "
                        "written by save_packed without spec); read it with load_packed, "
                        "or write it with pack_model")
    try:
        spec = ModelSpec.model_validate(raw_spec)
    except ValidationError as exc:
        raise UserError(f"{path}: corrupt packed file (its model spec: "
                        f"{exc.errors()[0]['msg']}); write it again") from None
    return model_from_state(spec, tensors, Path(path)), spec, header.get("meta") or {}
