"""What a model file is, told by its bytes: never by its name alone.

netshrink writes five kinds of model file, and reads each of them back wherever a model
file is asked for (``eval``, ``predict``, ``bench``, ``export``):

========== ============================================================================
kind       how it is recognised
========== ============================================================================
safetensors an 8-byte little-endian header length, then a JSON header inside the file
torch      the zip file ``torch.save`` writes (or an old plain pickle, which is refused
           when loaded)
nspk       netshrink's packed file: ``NSPK`` and a format digit (``store.packed``)
openvino   OpenVINO IR: an XML ``<net ... version="N">`` document with its ``.bin``
           beside it (same name); a folder holding one such ``.xml`` stands for it
onnx       a protobuf ``ModelProto`` that ``onnx`` parses, with a graph, and with its
           weights inside the file (no external data)
========== ============================================================================

netshrink's ONNX files and OpenVINO IR carry what the model's own ``.safetensors`` file
carries (dataset, class names, preprocessing, the validation split; the model spec; the
parameter, non-zero and MAC counts) as one JSON value: the ONNX model's
``metadata_props`` entry ``ONNX_INFO_KEY``, the IR's ``rt_info`` entry ``IR_INFO_KEY``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from netshrink.errors import UserError
from netshrink.limits import bounded_json, check_regular, open_regular, read_regular

if TYPE_CHECKING:
    import onnx

__all__ = [
    "ACCEPTED",
    "IR_INFO_KEY",
    "KINDS",
    "ONNX_INFO_KEY",
    "Kind",
    "file_kind",
    "kind_of_bytes",
    "locate_model",
    "netshrink_info",
    "onnx_info",
    "packed_header",
    "read_onnx",
]

Kind = Literal["safetensors", "torch", "onnx", "openvino", "nspk"]
KINDS: tuple[Kind, ...] = ("safetensors", "torch", "onnx", "openvino", "nspk")
ACCEPTED = ("safetensors, torch (.pth, the zip torch.save writes), ONNX, OpenVINO IR "
            "(.xml with its .bin) and netshrink packed (.nspk) files")
# Said of a file of each kind in messages.
DESCRIBED = {"safetensors": "a safetensors file", "torch": "a torch checkpoint",
             "onnx": "an ONNX model", "openvino": "OpenVINO IR",
             "nspk": "a netshrink packed file (.nspk)"}

ONNX_INFO_KEY = "netshrink.model"  # metadata_props key of netshrink's ONNX exports
IR_INFO_KEY = "netshrink_model"  # rt_info key of netshrink's OpenVINO IR (an XML tag name)
INFO_FORMAT = "netshrink.model/1"
MAX_INFO_BYTES = 16 << 20

# As store.checkpoint: the largest model netshrink reads is far below this; protobuf
# itself cannot hold more than 2 GiB.
MAX_MODEL_BYTES = 2 << 30
MAX_XML_BYTES = 1 << 30
_SNIFF = 64 << 10  # bytes read to tell a kind from its opening
_PACKED_MAGIC = b"NSPK"
_ZIP = b"PK\x03\x04"
_IR = re.compile(rb"^(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]*\?>\s*)?(?:<!--.*?-->\s*)*"
                 rb"<net\b[^>]*\bversion\s*=\s*[\"']\d+[\"']", re.DOTALL)
# The first tag of a serialized ModelProto (protobuf writes fields in number order):
# ir_version 1, producer_name 2, producer_version 3, domain 4, model_version 5,
# doc_string 6, graph 7, opset_import 8, metadata_props 14, training_info 20, functions 25.
_ONNX_FIRST = {0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA}


def _unknown(path: Path) -> UserError:
    return UserError(f"{path}: not a model file netshrink reads; it reads {ACCEPTED}")


def _head(path: Path, n: int = _SNIFF) -> bytes:
    with open_regular(path, "model file", max_bytes=MAX_MODEL_BYTES) as f:
        try:
            return f.read(n)
        except OSError as exc:
            raise UserError(f"{path}: cannot read the model file "
                            f"({exc.strerror or exc})") from None


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _quick_kind(head: bytes, size: int) -> Kind | None:
    """The kind an opening tells for sure, or None (ONNX needs a parse; others: unknown)."""
    if head.startswith(_PACKED_MAGIC):
        return "nspk"
    if _is_safetensors(head, size):
        return "safetensors"
    if head.startswith(_ZIP) or head[:1] == b"\x80":  # zip, or a plain pickle (refused)
        return "torch"
    if _IR.match(head):
        return "openvino"
    return None


def _parse_onnx(data: bytes) -> onnx.ModelProto | None:
    """``data`` as a ``ModelProto`` with a graph, or None when it is not one."""
    if not data or data[0] not in _ONNX_FIRST:
        return None
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError, TypeError):
        return None
    graph = model.graph
    if model.ir_version < 1 or not graph.node or not graph.input or not graph.output:
        return None
    return model


def kind_of_bytes(data: bytes) -> Kind | None:
    """The kind of a file whose bytes are ``data`` (all of them), or None if unknown."""
    kind = _quick_kind(data[:_SNIFF], len(data))
    if kind is None and _parse_onnx(data) is not None:
        kind = "onnx"
    return kind


def locate_model(path: Path) -> tuple[Path, Kind]:
    """The model file ``path`` names and its kind.

    A folder stands for the OpenVINO IR it holds (the ``quant.ptq`` stage with runtime
    openvino records its ``openvino/`` folder): ``model.xml``, or its only ``.xml``.

    Raises:
        UserError: missing, not a regular file, unreadable, an IR without its ``.bin``,
            an ONNX model with external data, or a kind netshrink does not read (one
            line naming the kinds it reads).
    """
    path = Path(path)
    if path.is_dir():
        xmls = sorted(path.glob("*.xml"))
        chosen = path / "model.xml" if (path / "model.xml").is_file() else None
        if chosen is None and len(xmls) == 1:
            chosen = xmls[0]
        if chosen is None:
            raise UserError(f"{path}: a folder{' of several .xml files' if xmls else ''}; "
                            f"pass the model file itself ({ACCEPTED})")
        path = chosen
    size = check_regular(path, "model file")
    head = _head(path)
    kind = _quick_kind(head, size)
    if kind == "openvino":
        bin_file = path.with_suffix(".bin")
        if not bin_file.exists():
            raise UserError(f"{path}: OpenVINO IR without its weights: {bin_file.name} is "
                            "not beside it; keep the .xml and .bin together")
        check_regular(bin_file, "OpenVINO weights (.bin)")
        if size > MAX_XML_BYTES:
            raise UserError(f"{path}: {size:,} bytes of IR XML, more than the "
                            f"{MAX_XML_BYTES:,} netshrink reads")
    if kind is None and head[:1] and head[0] in _ONNX_FIRST:
        read_onnx(path)  # raises for a damaged ONNX or one with external data
        kind = "onnx"
    if kind is None:
        # The bytes tell nothing. The name only decides which reader explains the damage
        # (a safetensors header that claims more than the file holds, say).
        if path.suffix.lower() == ".safetensors":
            return path, "safetensors"
        if path.suffix.lower() == ".onnx":
            read_onnx(path)  # raises, saying the ONNX file is damaged
        raise _unknown(path)
    return path, kind


def file_kind(path: Path) -> Kind:
    """``"safetensors"``, ``"torch"``, ``"onnx"``, ``"openvino"`` or ``"nspk"``, told by
    the file's bytes (see the module docstring); its name does not count.

    Raises:
        UserError: as ``locate_model``.
    """
    return locate_model(path)[1]


def read_onnx(path: Path) -> onnx.ModelProto:
    """An ONNX file's ``ModelProto``: a regular file of at most 2 GiB, parsed by onnx,
    with a graph and every weight inside the file.

    Raises:
        UserError: unreadable, not ONNX, or weights kept in external data files.
    """
    path = Path(path)
    data = read_regular(path, "ONNX model", max_bytes=MAX_MODEL_BYTES)
    model = _parse_onnx(data)
    if model is None:
        if path.suffix.lower() == ".onnx":
            raise UserError(f"{path}: not a readable ONNX model (protobuf cannot parse it "
                            "as a model with a graph); export it again")
        raise _unknown(path)
    check_self_contained(model, path)
    return model


def check_self_contained(model: onnx.ModelProto, path: Path) -> None:
    """Refuse an ONNX model whose weights live in external files (never opened here).

    Raises:
        UserError: an initializer stored as external data.
    """
    from onnx import TensorProto

    external = [t.name for t in model.graph.initializer
                if t.data_location == TensorProto.EXTERNAL]
    if external:
        raise UserError(f"{path}: an ONNX model whose weights are in external data files "
                        f"({len(external)} tensors, e.g. {external[0][:80]!r}); netshrink "
                        "reads self-contained ONNX: save it with onnx.save(model) without "
                        "save_as_external_data")


def packed_header(path: Path) -> dict[str, Any]:
    """The JSON header of a ``.nspk`` file, decompressing only as far as its end.

    Raises:
        UserError: not a packed file, or a damaged or oversized header.
    """
    import zstandard

    from netshrink.store.packed_codec import MAGIC
    from netshrink.store.packed_read import MAX_HEADER_BYTES

    path = Path(path)
    with open_regular(path, "packed model file", max_bytes=MAX_MODEL_BYTES) as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            if magic[:4] == MAGIC[:4]:
                raise UserError(f"{path}: packed format {magic[:5].decode(errors='replace')!r}"
                                f" is newer than this netshrink reads ({MAGIC[:5].decode()});"
                                " upgrade netshrink")
            raise _unknown(path)
        try:
            with zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=False) as r:
                size = int.from_bytes(r.read(8), "little")
                if size > MAX_HEADER_BYTES:
                    raise ValueError(f"the header claims {size:,} bytes")
                raw = r.read(size)
                if len(raw) != size:
                    raise ValueError("the data ends inside the header")
            header = bounded_json(raw, max_bytes=MAX_HEADER_BYTES)
        except (ValueError, zstandard.ZstdError, OSError) as exc:
            raise UserError(f"{path}: corrupt packed file ({exc}); write it again") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt packed file (its header is not a JSON object); "
                        "write it again")
    return header


def netshrink_info(raw: str | None, source: Path) -> dict[str, Any] | None:
    """The JSON value netshrink stores in an ONNX model or an IR, checked for shape:
    ``{"format", "meta", "spec", "stats", "runtime", "precision"}``; None when absent.

    Raises:
        UserError: present but not bounded JSON of that shape.
    """
    if raw is None:
        return None
    try:
        info = bounded_json(raw, max_bytes=MAX_INFO_BYTES)
    except ValueError as exc:
        raise UserError(f"{source}: corrupt netshrink metadata ({exc}); export it "
                        "again") from None
    if not isinstance(info, dict) or info.get("format") != INFO_FORMAT:
        raise UserError(f"{source}: netshrink metadata of an unknown format; export it again "
                        "with this netshrink")
    for key, kind in (("meta", dict), ("spec", dict), ("stats", dict), ("runtime", str),
                      ("precision", str)):
        if info.get(key) is not None and not isinstance(info[key], kind):
            raise UserError(f"{source}: corrupt netshrink metadata ({key} is "
                            f"{type(info[key]).__name__}); export it again")
    return info


def onnx_info(model: onnx.ModelProto, source: Path) -> dict[str, Any] | None:
    """``netshrink_info`` of an ONNX model's ``metadata_props``; None without it."""
    props = {p.key: p.value for p in model.metadata_props}
    return netshrink_info(props.get(ONNX_INFO_KEY), source)


def make_info(*, meta: dict[str, Any] | None, spec: dict[str, Any] | None,
              stats: dict[str, Any] | None, runtime: str | None = None,
              precision: str | None = None) -> str:
    """The JSON value ``netshrink_info`` reads: the checkpoint meta, the model spec (as
    ``ModelSpec.model_dump(mode="json")``), the counts (``params``, ``nonzero_params``,
    ``macs``), and the runtime and precision the run measured the file in."""
    import json

    return json.dumps({"format": INFO_FORMAT, "meta": meta or {}, "spec": spec,
                       "stats": stats, "runtime": runtime, "precision": precision})


def is_packed(path: Path) -> bool:
    """Whether ``path`` (a regular file) starts like a netshrink packed file."""
    try:
        with open_regular(Path(path), "model file") as f:
            return f.read(len(_PACKED_MAGIC)) == _PACKED_MAGIC
    except UserError:
        return False
