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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import zstandard
from pydantic import ValidationError
from torch import Tensor, nn

from netshrink.errors import UserError
from netshrink.models import ModelSpec
from netshrink.store.atomic import atomic_writer
from netshrink.store.bitpack import pack_bits
from netshrink.store.checkpoint import built_spec, check_meta, check_spec, model_from_state
from netshrink.store.codebook import Codebook
from netshrink.store.packed_codec import (
    _DTYPES,
    FORMAT,
    MAGIC,
    VERSION,
    Int8Weight,
    _dtype_name,
    _mask_bytes,
    _plain_parts,
    _tensor_bytes,
    dequantize_int8,
)
from netshrink.store.packed_read import _read_tensors, load_packed

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
    # The frame declares its content size (the pledged ``size``): readers refuse frames
    # that do not, so that what a file decompresses to is known before it is.
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True,
                                    threads=-1)
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
    check_spec(spec, Path(path))
    meta = check_meta(header.get("meta") or {}, spec, Path(path))
    size = meta.get("image_size") if isinstance(meta.get("image_size"), int) else None
    model = model_from_state(spec, tensors, Path(path), image_size=size)
    return model, built_spec(model, spec), meta
