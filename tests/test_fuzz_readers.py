"""Fuzzing the file readers: whatever the bytes, a reader returns or raises ``UserError``.

Any other exception would reach the user as a traceback, so it fails the test; so does
an example slower than the deadline (a reader that allocated or decompressed what a
header merely claims would be), and a process whose peak memory grew by more than
``RSS_BOUND`` over a whole run. Each reader gets structured inputs (headers and
metadata built field by field, with hostile values mixed in) and byte mutations of a
valid file of its kind.

The default run tries ``FAST`` examples per reader; ``pytest -m slow`` runs the same
readers with ``NETSHRINK_FUZZ_EXAMPLES`` (default 5000) each.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import resource
import struct
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from fixtures_data import (
    CIFAR10_NAMES,
    write_cifar10_binary,
    write_cifar10_python,
    write_idx,
    write_image_folder,
)
from netshrink.data.cifar import _batch_arrays, read_cifar10
from netshrink.data.idx import read_idx
from netshrink.data.images import check_image
from netshrink.errors import UserError
from netshrink.models import build_model
from netshrink.predict import load_image
from netshrink.store.checkpoint import FORMAT, load_model, read_state_dict
from netshrink.store.packed import MAGIC, load_packed, load_packed_model, pack_model
from netshrink.store.packed_codec import _DTYPES
from netshrink.store.packed_onnx import unpack_onnx
from test_hostile_readers import GRAY, gray_meta, model_file

FAST = 200
SLOW = int(os.environ.get("NETSHRINK_FUZZ_EXAMPLES", "5000"))
DEADLINE = timedelta(seconds=5)  # per example; the slowest honest ones take ~50 ms
RSS_BOUND = 1536 << 20  # bytes the peak resident size may grow by during one reader's run

# ------------------------------------------------------------------------ strategies

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=12,
)
deep_json = st.integers(1, 300_000).map(lambda n: "[" * n + "]" * n)
big_int = st.one_of(st.integers(-3, 40), st.integers(-(2**64), 2**64),
                    st.sampled_from([0, 1, 10**12, 2**31 - 1, 2**63 - 1, 2**64 - 1]))


def maybe(strategy: st.SearchStrategy, other: st.SearchStrategy = json_value):
    """Mostly ``strategy``, sometimes any JSON value of another type."""
    return st.one_of(strategy, strategy, other)


spec_dict = st.fixed_dictionaries({}, optional={
    "arch": maybe(st.sampled_from(["resnet_tiny", "resnet18", "resnet101", "", "nope"])),
    "num_classes": maybe(big_int),
    "in_channels": maybe(big_int),
    "stem": maybe(st.sampled_from(["cifar", "imagenet", "x"])),
    "pruned": maybe(st.booleans()),
    "zero_init_residual": maybe(st.booleans()),
    "other": json_value,
})
float_list = st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5)
meta_dict = st.fixed_dictionaries({}, optional={
    "dataset": maybe(st.sampled_from(["digits", "fashion_mnist", "", "x" * 300])),
    "class_names": maybe(st.lists(st.text(max_size=4), max_size=12)),
    "image_size": maybe(big_int),
    "in_channels": maybe(big_int),
    "mean": maybe(float_list),
    "std": maybe(float_list),
    "other": json_value,
})


def json_text(value: st.SearchStrategy) -> st.SearchStrategy:
    """JSON text of ``value``, or text that is not quite that: cut, deep, NaN, junk."""
    dumped = value.map(lambda v: json.dumps(v, allow_nan=True))
    return st.one_of(dumped, dumped, dumped.map(lambda t: t[: len(t) // 2]), deep_json,
                     st.text(max_size=40))


# The metadata of a netshrink safetensors model file, every field hostile at times.
st_metadata = st.fixed_dictionaries(
    {"format": st.sampled_from([FORMAT, FORMAT, "netshrink.model/2"])},
    optional={"spec": json_text(spec_dict), "meta": json_text(meta_dict),
              "x": st.text(max_size=10)},
)


@st.composite
def safetensors_bytes(draw) -> bytes:
    """A header length, a header (JSON of offsets/dtypes/shapes, or junk) and a tail."""
    entries = draw(st.dictionaries(
        st.text(min_size=1, max_size=6),
        st.fixed_dictionaries({
            "dtype": maybe(st.sampled_from(["F32", "F16", "I64", "U8", "BOOL", "X"])),
            "shape": maybe(st.lists(big_int, max_size=4)),
            "data_offsets": maybe(st.lists(big_int, min_size=2, max_size=2)),
        }),
        max_size=3,
    ))
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), json_value,
                                                       max_size=3))
    header = draw(st.one_of(st.just(json.dumps(entries).encode()), st.binary(max_size=64),
                            deep_json.map(str.encode)))
    tail = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(len(header)), big_int.filter(lambda n: 0 <= n < 2**64)))
    return length.to_bytes(8, "little") + header + tail


@st.composite
def idx_bytes(draw) -> tuple[bytes, bool]:
    """An IDX file: magic, type, rank, dims (any int32) and some data, maybe gzipped."""
    rank = draw(st.one_of(st.integers(0, 4), st.integers(0, 255)))
    dims = draw(st.lists(st.one_of(st.integers(0, 6), st.integers(-(2**31), 2**31 - 1)),
                         min_size=min(rank, 6), max_size=min(rank, 6)))
    head = bytes([draw(st.sampled_from([0, 0, 0, 1])), 0,
                  draw(st.sampled_from([8, 8, 8, 9, 13])), rank])
    head += struct.pack(f">{len(dims)}i", *dims)
    count = int(np.prod(dims)) if dims and all(0 <= d <= 6 for d in dims) else 0
    body = bytes(max(0, count + draw(st.integers(-3, 3))))
    raw = head + body + draw(st.binary(max_size=8))
    gz = draw(st.booleans())
    if gz:
        raw = gzip.compress(raw, compresslevel=1)
        raw = draw(st.sampled_from([raw, raw[:-4], raw + b"\0\0", raw + b"junk",
                                    raw + gzip.compress(b"more")]))
    return raw, gz


def _g(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


_SNIPPETS = [
    b"(", b"}", b"]", b")", b"\x85", b"\x86", b"\x87", b"t", b"l", b"d", b"s", b"u",
    b"a", b"e", b"b", b"R", b"\x81", b"0", b"1", b"2", b"N", b"\x88", b"\x89", b"\x94",
    b"\x8f", b"\x90", b"\x91",
    _g("numpy.core.multiarray", "_reconstruct"), _g("numpy._core.multiarray", "_reconstruct"),
    _g("numpy", "ndarray"), _g("numpy", "dtype"), _g("os", "system"),
    _g("__builtin__", "eval"), b"U\x01b", b"U\x02u1", b"U\x02S9", b"U\x01O", b"U\x01|",
    b"U\x04data", b"U\x06labels", b"X\x04\x00\x00\x00data",
]


@st.composite
def pickle_program(draw) -> bytes:
    """A protocol-2 opcode stream from snippets: the containers and numpy calls a CIFAR
    batch uses, with random numbers, strings, memo indices and lengths mixed in."""
    parts = [b"\x80\x02"]
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.integers(0, 9))
        if kind < 5:
            parts.append(draw(st.sampled_from(_SNIPPETS)))
        elif kind == 5:
            n = draw(big_int.filter(lambda v: -(2**63) <= v < 2**63))
            body = n.to_bytes(8, "little", signed=True)
            parts.append(draw(st.sampled_from([b"J" + body[:4], b"K" + body[:1],
                                               b"\x8a\x08" + body, b"M" + body[:2]])))
        elif kind == 6:
            data = draw(st.binary(max_size=40))
            parts.append(b"U" + bytes([len(data)]) + data)
        elif kind == 7:
            parts.append(draw(st.sampled_from([b"q", b"h", b"r", b"j"]))
                         + draw(st.binary(min_size=4, max_size=4)))
        elif kind == 8:
            parts.append(draw(st.sampled_from([b"T", b"B", b"\x8e", b"\x95", b"\x8d"]))
                         + draw(st.binary(min_size=4, max_size=8)))
        else:
            parts.append(draw(st.binary(max_size=6)))
    if draw(st.booleans()):
        parts.append(b".")
    return b"".join(parts)


part_place = maybe(st.lists(big_int, min_size=2, max_size=2))


@st.composite
def packed_bytes(draw) -> bytes:
    """A packed file: a header of tensor entries (shapes, dtypes, encodings, parts, all
    sometimes absurd) and data, in one zstd frame that declares its size, or not."""
    names = [*_DTYPES, "complex64", 7]
    tensors = draw(st.lists(st.fixed_dictionaries({
        "name": maybe(st.text(max_size=6)),
        "dtype": st.sampled_from(names),
        "shape": maybe(st.lists(big_int, max_size=4)),
        "encoding": maybe(st.sampled_from(["dense", "sparse", "codebook", "int8", "zip"])),
        "parts": maybe(st.dictionaries(
            st.sampled_from(["values", "mask", "centroids", "indices", "scale",
                             "zero_point"]), part_place, max_size=4)),
        "bits": maybe(st.integers(0, 9)),
        "index": maybe(st.integers(-1, 3)),
    }), max_size=4))
    header: dict[str, Any] = {
        "format": draw(st.sampled_from(["netshrink.packed", "netshrink.packed", "x"])),
        "version": draw(st.sampled_from([1, 1, 1, 2, "1"])),
        "kind": draw(st.sampled_from(["state_dict", "state_dict", "onnx", "x"])),
        "meta": draw(maybe(st.just({}))),
        "spec": draw(st.one_of(st.none(), spec_dict)),
        "tensors": tensors,
    }
    if draw(st.booleans()):
        header["graph"] = draw(part_place)
    head = draw(st.one_of(st.just(json.dumps(header).encode()),
                          deep_json.map(str.encode), st.binary(max_size=30)))
    sizes = [w[1] for t in tensors if isinstance(t["parts"], dict)
             for w in t["parts"].values() if isinstance(w, list) and len(w) == 2
             and isinstance(w[1], int) and 0 <= w[1] <= 4096]
    blobs = draw(st.one_of(st.binary(max_size=64), st.just(bytes(sum(sizes))),
                           st.binary(min_size=sum(sizes), max_size=sum(sizes))))
    length = draw(st.one_of(st.just(len(head)), big_int.filter(lambda n: 0 <= n < 2**64)))
    payload = length.to_bytes(8, "little") + head + blobs
    declare = draw(st.sampled_from([True, True, True, False]))
    frame = zstandard.ZstdCompressor(write_content_size=declare).compress(payload)
    return MAGIC + draw(st.sampled_from([frame, frame, frame[:-3], frame + b"x"]))


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` with a few bytes changed, maybe cut short or extended."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        where = draw(st.one_of(st.integers(0, min(len(data), 256) - 1),
                               st.integers(0, len(data) - 1)))
        data[where] = draw(st.one_of(st.integers(0, 255),
                                     st.just(data[where] ^ 0x80), st.just(0), st.just(255)))
    cut = draw(st.sampled_from([None, None, None, "cut", "grow"]))
    if cut == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif cut == "grow":
        data += draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


# ------------------------------------------------------------------- valid files


def valid_files(folder: Path) -> dict[str, tuple[Path, bytes]]:
    """One valid file of each kind, as ``kind -> (path to write to, its bytes)``."""
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    made["safetensors"] = model_file(folder / "model.safetensors")
    torch.save(build_model(GRAY).state_dict(), folder / "model.pth")
    made["pth"] = folder / "model.pth"
    torch.manual_seed(0)
    pack_model(build_model(GRAY).eval(), GRAY, folder / "model.nspk", meta=gray_meta())
    made["nspk"] = folder / "model.nspk"
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    made["idx"] = write_idx(folder / "images-idx3-ubyte", images)
    made["idx.gz"] = write_idx(folder / "images-idx3-ubyte.gz", images)
    write_cifar10_python(folder / "c10py", 1)
    made["cifar-pickle"] = folder / "c10py" / "cifar-10-batches-py" / "data_batch_1"
    write_cifar10_binary(folder / "c10bin", 1)
    made["cifar-binary"] = folder / "c10bin" / "cifar-10-batches-bin" / "data_batch_1.bin"
    written = write_image_folder(folder / "imgs", classes=("a",), per_class=2,
                                 val_per_class=0, size=(9, 7))
    made["png"] = next(p for p, _ in written["train"] if p.suffix == ".png")
    made["jpeg"] = next(p for p, _ in written["train"] if p.suffix == ".JPEG")
    # Mutants are written next to the original (a CIFAR batch must sit in its folder).
    return {kind: (path if kind == "cifar-binary" else
                   path.with_name(f"fuzz-{kind.replace('.', '-')}{''.join(path.suffixes)}"),
                   path.read_bytes())
            for kind, path in made.items()}


def read_kind(kind: str, path: Path) -> None:
    """Run the reader a file of ``kind`` goes through."""
    if kind in ("safetensors", "pth"):
        load_model(path)
    elif kind == "nspk":
        load_packed_model(path)
    elif kind.startswith("idx"):
        read_idx(path)
    elif kind == "cifar-pickle":
        _batch_arrays(path, "labels")
    elif kind == "cifar-binary":
        read_cifar10(path.parent)
    else:
        check_image(path)
        load_image(path, in_channels=3, size=8)


# ------------------------------------------------------------------- the harness

COUNTS: Counter[str] = Counter()


def fuzz(name: str, strategy: st.SearchStrategy, check: Callable[[Any], None],
         examples: int) -> None:
    """Run ``check`` on ``examples`` drawn inputs; only ``UserError`` may escape."""
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outcomes: Counter[str] = Counter()

    @settings(max_examples=examples, deadline=DEADLINE, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(strategy)
    def run(value: Any) -> None:
        COUNTS[name] += 1
        try:
            check(value)
        except UserError as exc:
            message = str(exc)
            assert message and "\n" not in message and len(message) < 4000, message
            outcomes["UserError"] += 1
        else:
            outcomes["read"] += 1

    run()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss
    assert grown < RSS_BOUND, f"{name}: peak memory grew by {grown / 2**20:.0f} MiB"
    print(f"fuzz {name}: {sum(outcomes.values())} cases, {outcomes['UserError']} UserError, "
          f"{outcomes['read']} read, 0 other exceptions")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid(work: Path) -> dict[str, tuple[Path, bytes]]:
    return valid_files(work / "valid")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def readers(work: Path, valid: dict[str, tuple[Path, bytes]]
            ) -> dict[str, tuple[st.SearchStrategy, Callable[[Any], None]]]:
    """Reader name -> (inputs, what to do with one)."""
    tensors = {k: v.contiguous() for k, v in build_model(GRAY).state_dict().items()}
    small = {"fc.weight": tensors["fc.weight"]}

    def st_meta(value: tuple[dict[str, str], bool]) -> None:
        meta, whole = value
        body = st_save(tensors if whole else small, metadata=meta)
        load_model(_write(work / "meta.safetensors", body))

    def st_header(data: bytes) -> None:
        read_state_dict(_write(work / "header.safetensors", data))
        load_model(_write(work / "header.bin", data))

    def idx(value: tuple[bytes, bool]) -> None:
        data, gz = value
        read_idx(_write(work / ("x-idx" + (".gz" if gz else "")), data))

    def cifar_pickle(program: bytes) -> None:
        _batch_arrays(_write(work / "batch", program), "labels")

    folder = work / "c10bin" / "cifar-10-batches-bin"
    if not folder.exists():
        write_cifar10_binary(work / "c10bin", 1)

    def cifar_binary(value: tuple[bytes, bytes]) -> None:
        records, names = value
        (folder / "test_batch.bin").write_bytes(records)
        (folder / "batches.meta.txt").write_bytes(names)
        read_cifar10(folder)

    def packed(data: bytes) -> None:
        path = _write(work / "x.nspk", data)
        for reader in (load_packed_model, unpack_onnx):
            with contextlib.suppress(UserError):
                reader(path)
        load_packed(path)

    def mutation(value: tuple[str, bytes]) -> None:
        kind, data = value
        read_kind(kind, _write(valid[kind][0], data))

    record = 3073
    names_text = ("\n".join(CIFAR10_NAMES) + "\n").encode()
    return {
        "safetensors-metadata": (st.tuples(st_metadata, st.booleans()), st_meta),
        "safetensors-header": (safetensors_bytes(), st_header),
        "idx": (idx_bytes(), idx),
        "cifar-pickle": (st.one_of(pickle_program(), mutated(valid["cifar-pickle"][1])),
                         cifar_pickle),
        "cifar-binary": (st.tuples(
            st.one_of(st.binary(max_size=64), st.integers(0, 3).map(lambda n: bytes(n * record)),
                      st.integers(1, 3).flatmap(lambda n: st.binary(min_size=n * record,
                                                                    max_size=n * record))),
            st.one_of(st.just(names_text), st.binary(max_size=200),
                      mutated(names_text))), cifar_binary),
        "nspk": (packed_bytes(), packed),
        "mutations": (st.sampled_from(sorted(valid)).flatmap(
            lambda kind: st.tuples(st.just(kind), mutated(valid[kind][1]))), mutation),
    }


READERS = ["safetensors-metadata", "safetensors-header", "idx", "cifar-pickle",
           "cifar-binary", "nspk", "mutations"]


@pytest.mark.parametrize("name", READERS)
def test_fuzz_reader(name: str, work: Path, valid) -> None:
    strategy, check = readers(work, valid)[name]
    fuzz(name, strategy, check, FAST)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", READERS)
def test_fuzz_reader_slow(name: str, work: Path, valid) -> None:
    strategy, check = readers(work, valid)[name]
    fuzz(name, strategy, check, SLOW)


def test_valid_files_of_every_kind_read(work: Path, valid) -> None:
    """The mutation fuzz starts from files the readers accept."""
    for kind, (path, data) in valid.items():
        read_kind(kind, _write(path, data))
    assert len(valid) == 9


@pytest.mark.parametrize("gz", [False, True])
def test_an_empty_dimension_beside_huge_ones_is_refused(tmp_path: Path, gz: bool) -> None:
    # Found by the slow fuzz run: dims (0, ..., 9811656, 512, 1836020325) count 0 bytes,
    # yet numpy refuses to shape even an empty array that way (a ValueError, not ours).
    dims = (0, 0, 0, 0, 0, 9811656, 512, 1836020325)
    data = bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}i", *dims)
    path = tmp_path / ("x-idx3-ubyte.gz" if gz else "x-idx3-ubyte")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(UserError, match="empty dimension"):
        read_idx(path)
