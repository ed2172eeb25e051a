"""Packed ONNX files: a model's initializers stored sparse or dense (see ``store.packed``
for the encodings), the rest of the graph as is; unpacking gives the same model bytes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from netshrink.errors import UserError
from netshrink.store.packed import _Blobs, _write
from netshrink.store.packed_codec import _DTYPES, FORMAT, VERSION, _CorruptError, _plain_parts
from netshrink.store.packed_read import _check_sizes, _open, _plain_words, _shape, _short

__all__ = ["pack_onnx", "unpack_onnx"]


def _onnx_dtypes() -> dict[int, str]:
    from onnx import TensorProto as T  # late: only the ONNX functions need onnx

    return {T.FLOAT: "float32", T.DOUBLE: "float64", T.FLOAT16: "float16",
            T.BFLOAT16: "bfloat16", T.INT8: "int8", T.UINT8: "uint8", T.INT16: "int16",
            T.UINT16: "uint16", T.INT32: "int32", T.UINT32: "uint32", T.INT64: "int64",
            T.UINT64: "uint64", T.BOOL: "bool"}


def pack_onnx(onnx_path: Path, out_path: Path, *, meta: dict[str, Any] | None = None,
              level: int = 3) -> int:
    """Pack an ONNX model: its initializers sparse or dense, the rest of the graph as is.

    Every top-level initializer held as ``raw_data`` in a dtype of whole bytes is stored
    like a tensor of ``save_packed`` (``sparse`` when smaller: pruned int8/uint8/float
    weights become a bitmask plus the non-zero values); the model proto, with those
    initializers emptied, is stored whole. Initializers in other forms (``float_data``,
    strings, 4-bit types, subgraph constants) stay inside the proto untouched. External
    data is read in by ``onnx.load`` and packed like the rest.

    Args:
        onnx_path: the ``.onnx`` file.
        out_path: the packed file to write, atomically.
        meta: JSON-able facts kept with it.
        level: zstd level.

    Returns:
        The packed file's size in bytes.

    Raises:
        UserError: a missing or unreadable ONNX file.
    """
    import onnx
    from onnx import TensorProto

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: ONNX model not found; check the path")
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors alike
        raise UserError(f"{onnx_path}: not a readable ONNX model ({str(exc)[:160]}); "
                        "export it again") from None
    dtypes = _onnx_dtypes()
    blobs = _Blobs()
    entries = []
    for index, init in enumerate(model.graph.initializer):
        name = dtypes.get(init.data_type)
        if (name is None or not init.HasField("raw_data")
                or init.data_location == TensorProto.EXTERNAL):
            continue
        dt = _DTYPES[name]
        raw = np.frombuffer(init.raw_data, dtype=np.uint8)
        if raw.size != math.prod(init.dims) * dt.itemsize:
            continue  # malformed, but not ours to fix: keep it as it is
        encoding, parts = _plain_parts(raw, dt)
        entries.append({"name": init.name, "index": index, "dtype": name,
                        "shape": list(init.dims), "encoding": encoding,
                        "parts": blobs.add(parts)})
        init.ClearField("raw_data")
    graph = blobs.add({"graph": model.SerializeToString()})["graph"]
    header = {"format": FORMAT, "version": VERSION, "kind": "onnx", "meta": meta or {},
              "spec": None, "tensors": entries, "graph": graph}
    return _write(Path(out_path), header, blobs, level)


def unpack_onnx(packed_path: Path) -> bytes:
    """The serialized ONNX ``ModelProto`` that ``pack_onnx`` packed.

    Every initializer gets its exact bytes back (zeros as +0.0), so onnxruntime computes
    the same outputs; save the bytes as a ``.onnx`` file or pass them to
    ``onnxruntime.InferenceSession`` directly.

    Raises:
        UserError: a missing file, not a packed ONNX file, truncated or corrupt data, or
            an encoding or version this netshrink does not know.
    """
    import onnx
    from google.protobuf.message import DecodeError

    f = _open(Path(packed_path), "onnx")
    try:
        _check_sizes(f)
        model = onnx.ModelProto()
        model.ParseFromString(bytes(f.part(f.header["graph"])))
        inits = model.graph.initializer
        for entry in f.header["tensors"]:
            dt = _DTYPES[entry["dtype"]]
            _, n = _shape(entry)
            if entry["encoding"] not in ("dense", "sparse"):
                raise UserError(f"{f.path}: initializer {_short(entry.get('name'))} uses "
                                f"encoding {_short(entry['encoding'])}, which packed ONNX "
                                "files do not use; upgrade netshrink")
            index = entry["index"]
            if not isinstance(index, int) or not 0 <= index < len(inits) \
                    or inits[index].name != entry["name"]:
                raise _CorruptError(f"initializer {_short(entry['name'])} is not at "
                                    f"{_short(index)}")
            words = _plain_words(f, entry["parts"], dt, n, entry["encoding"] == "sparse")
            inits[index].raw_data = words.tobytes()
    except (_CorruptError, DecodeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{f.path}: corrupt packed file ({type(exc).__name__}: {exc}); "
                        "write it again") from None
    return model.SerializeToString()
