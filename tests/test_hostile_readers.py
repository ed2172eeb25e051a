"""Hostile input: every bad file gives one line on stderr (exit 2), no traceback, no hang,
no huge allocation, and nothing changed outside the test's own folder.

Each case builds its file(s) in ``tmp_path`` and runs the public command that would read
them (``eval``, ``predict``, ``bench``), or, where no command reads that kind of file
directly (packed files, the up-front image-folder check), the reader function.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from PIL import Image

from fixtures_data import (
    write_cifar10_binary,
    write_cifar10_python,
    write_idx_dataset,
    write_image_folder,
    write_py2_pickle,
)
from netshrink.cli import main
from netshrink.data.imagefolder import check_image_folder
from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model
from netshrink.store.checkpoint import load_model, save_model
from netshrink.store.packed import MAGIC, load_packed_model, pack_model

# ------------------------------------------------------------------------ valid files

GRAY = ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1, stem="cifar")
RGB = ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=3, stem="cifar")


def gray_meta(dataset: str = "digits", image_size: int = 8) -> dict[str, Any]:
    return {"dataset": dataset, "class_names": [str(i) for i in range(10)],
            "image_size": image_size, "in_channels": 1, "mean": [0.3], "std": [0.37]}


def rgb_meta(dataset: str = "cifar10", image_size: int = 8) -> dict[str, Any]:
    return {"dataset": dataset, "class_names": [f"c{i}" for i in range(10)],
            "image_size": image_size, "in_channels": 3, "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25]}


def model_file(path: Path, spec: ModelSpec = GRAY, meta: dict | None = None) -> Path:
    """A valid netshrink model file (a tiny ResNet, seeded)."""
    torch.manual_seed(0)
    save_model(build_model(spec).eval(), spec, path, meta=gray_meta() if meta is None else meta)
    return path


def with_metadata(src: Path, dst: Path, edit: Callable[[dict[str, str]], None]) -> Path:
    """``src`` with its safetensors ``__metadata__`` changed by ``edit`` (tensors kept)."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header["__metadata__"])
    body = json.dumps(header).encode()
    dst.write_bytes(len(body).to_bytes(8, "little") + body + data[8 + n :])
    return dst


def with_meta_key(src: Path, dst: Path, **changes: Any) -> Path:
    """``src`` with keys of its JSON ``meta`` string changed."""
    def edit(md: dict[str, str]) -> None:
        meta = json.loads(md["meta"])
        meta.update(changes)
        md["meta"] = json.dumps(meta)
    return with_metadata(src, dst, edit)


def with_spec_key(src: Path, dst: Path, **changes: Any) -> Path:
    def edit(md: dict[str, str]) -> None:
        spec = json.loads(md["spec"])
        spec.update(changes)
        md["spec"] = json.dumps(spec)
    return with_metadata(src, dst, edit)


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature, IHDR and a tiny IDAT claiming ``width`` x ``height``."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b""))


def small_png(path: Path) -> Path:
    Image.fromarray(np.full((12, 12, 3), 90, dtype=np.uint8)).save(path)
    return path


def zstd_frame_claiming(size: int, content: bytes = b"\0" * 16) -> bytes:
    """A zstd frame whose header says it holds ``size`` bytes (one raw block follows)."""
    descriptor = bytes([0b1110_0000])  # 8-byte content size, single segment, no checksum
    block = (1 | (len(content) << 3)).to_bytes(3, "little")  # last block, raw
    return (0xFD2FB528).to_bytes(4, "little") + descriptor + size.to_bytes(8, "little") \
        + block + content


def packed_payload(header: dict[str, Any], blobs: bytes = b"") -> bytes:
    body = json.dumps(header).encode()
    return len(body).to_bytes(8, "little") + body + blobs


def packed_file(path: Path) -> Path:
    torch.manual_seed(0)
    pack_model(build_model(GRAY).eval(), GRAY, path, meta=gray_meta())
    return path


def packed_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    payload = zstandard.ZstdDecompressor().decompress(path.read_bytes()[len(MAGIC) :])
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8 : 8 + n]), payload[8 + n :]


def repacked(path: Path, header: dict[str, Any], blobs: bytes) -> Path:
    frame = zstandard.ZstdCompressor().compress(packed_payload(header, blobs))
    path.write_bytes(MAGIC + frame)
    return path


def idx_header(*dims: int) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}i", *dims)


def pickle_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def reconstruct_pickle(count: int) -> bytes:
    """A protocol-2 pickle of ``{'data': _reconstruct(ndarray, (count,), 'b')}``."""
    return (b"\x80\x02}U\x04data" + pickle_global("numpy.core.multiarray", "_reconstruct")
            + pickle_global("numpy", "ndarray") + b"\x8a\x08" + count.to_bytes(8, "little")
            + b"\x85U\x01b\x87Rs.")


def build_pickle(count: int) -> bytes:
    """An array whose BUILD state claims ``count`` bytes but carries three."""
    return (b"\x80\x02}U\x04data" + pickle_global("numpy.core.multiarray", "_reconstruct")
            + pickle_global("numpy", "ndarray") + b"K\x00\x85U\x01b\x87R"
            + b"(K\x01\x8a\x08" + count.to_bytes(8, "little") + b"\x85"
            + pickle_global("numpy", "dtype") + b"U\x02u1K\x00K\x01\x87R"
            + b"\x89U\x03abctbs.")


# ------------------------------------------------------------------------ the cases

# A case gets a folder for its inputs and returns what to run: argv for the CLI, or a
# callable (a reader) that must raise UserError.
Run = list[str] | Callable[[], Any]


def st_spec(tmp: Path) -> Run:
    f = with_spec_key(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      num_classes=10**12)
    return ["bench", "--weights", str(f), "--repeats", "1"]


def st_spec_not_json(tmp: Path) -> Run:
    f = with_metadata(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      lambda md: md.update(spec="{arch: resnet_tiny"))
    return ["eval", "--weights", str(f), "--data", "digits"]


def st_no_spec(tmp: Path) -> Run:
    f = with_metadata(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      lambda md: md.pop("spec"))
    return ["eval", "--weights", str(f), "--data", "digits"]


def st_deep_meta(tmp: Path) -> Run:
    f = with_metadata(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      lambda md: md.update(meta="[" * 200_000 + "]" * 200_000))
    return ["eval", "--weights", str(f), "--data", "digits"]


def st_deep_spec(tmp: Path) -> Run:
    f = with_metadata(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      lambda md: md.update(spec='{"a":' * 100_000 + "1" + "}" * 100_000))
    return ["eval", "--weights", str(f), "--data", "digits"]


def st_no_class_names(tmp: Path) -> Run:
    f = with_meta_key(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      class_names=[])
    return ["predict", "--weights", str(f), str(small_png(tmp / "x.png"))]


def st_image_size_zero(tmp: Path) -> Run:
    f = with_meta_key(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors", image_size=0)
    return ["predict", "--weights", str(f), str(small_png(tmp / "x.png"))]


def st_image_size_text(tmp: Path) -> Run:
    f = with_meta_key(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      image_size="x")
    return ["eval", "--weights", str(f), "--data", "digits"]


def st_mean_four_values(tmp: Path) -> Run:
    f = with_meta_key(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      mean=[0.1, 0.2, 0.3, 0.4])
    return ["predict", "--weights", str(f), str(small_png(tmp / "x.png"))]


def st_std_nan(tmp: Path) -> Run:
    f = with_metadata(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      lambda md: md.update(meta=md["meta"].replace("0.37", "NaN")))
    return ["predict", "--weights", str(f), str(small_png(tmp / "x.png"))]


def st_header_past_end(tmp: Path) -> Run:
    f = tmp / "m.safetensors"
    data = model_file(tmp / "ok.safetensors").read_bytes()
    f.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])
    return ["eval", "--weights", str(f), "--data", "digits"]


def st_metadata_not_strings(tmp: Path) -> Run:
    f = tmp / "m.safetensors"
    data = model_file(tmp / "ok.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["meta"] = {"nested": True}
    body = json.dumps(header).encode()
    f.write_bytes(len(body).to_bytes(8, "little") + body + data[8 + n :])
    return ["eval", "--weights", str(f), "--data", "digits"]


def pth_int_keys(tmp: Path) -> Run:
    f = tmp / "m.pth"
    torch.save({0: torch.zeros(3)}, f)
    return ["eval", "--weights", str(f), "--data", "digits"]


def pth_plain_pickle(tmp: Path) -> Run:
    f = tmp / "m.pth"
    f.write_bytes(b"\x80\x02" + pickle_global("os", "system") + b"U\x04true\x85R.")
    return ["eval", "--weights", str(f), "--data", "digits"]


def pth_deflated_zip(tmp: Path) -> Run:
    src = tmp / "ok.pth"
    torch.save(build_model(GRAY).state_dict(), src)
    f = tmp / "m.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    return ["eval", "--weights", str(f), "--data", "digits"]


def weights_fifo(tmp: Path) -> Run:
    f = tmp / "m.safetensors"
    os.mkfifo(f)
    return ["eval", "--weights", str(f), "--data", "digits"]


def weights_folder(tmp: Path) -> Run:
    (tmp / "m.safetensors").mkdir()
    return ["bench", "--weights", str(tmp / "m.safetensors"), "--repeats", "1"]


def predict_fifo_image(tmp: Path) -> Run:
    image = tmp / "x.png"
    os.mkfifo(image)
    return ["predict", "--weights", str(model_file(tmp / "m.safetensors")), str(image)]


def predict_png_bomb(tmp: Path) -> Run:
    image = tmp / "bomb.png"
    image.write_bytes(png_header(20_000, 20_000))
    return ["predict", "--weights", str(model_file(tmp / "m.safetensors")), str(image)]


def predict_not_an_image(tmp: Path) -> Run:
    image = tmp / "x.png"
    image.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    return ["predict", "--weights", str(model_file(tmp / "m.safetensors")), str(image)]


def nspk_no_content_size(tmp: Path) -> Run:
    header, blobs = packed_parts(packed_file(tmp / "ok.nspk"))
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame = cobj.compress(packed_payload(header, blobs)) + cobj.flush()
    f = tmp / "m.nspk"
    f.write_bytes(MAGIC + frame)
    return lambda: load_packed_model(f)


def nspk_claims_64_gb(tmp: Path) -> Run:
    f = tmp / "m.nspk"
    f.write_bytes(MAGIC + zstd_frame_claiming(64 << 30))
    return lambda: load_packed_model(f)


def nspk_zero_bomb(tmp: Path) -> Run:
    """40 KB that would inflate to 200 MB: a header for one huge dense tensor."""
    n = 50_000_000
    header = {"format": "netshrink.packed", "version": 1, "kind": "state_dict", "meta": {},
              "spec": None, "tensors": [{"name": "w", "dtype": "float32", "shape": [n],
                                         "encoding": "dense", "parts": {"values": [0, 4 * n]}}]}
    body = json.dumps(header).encode()
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=8 + len(body) + 4 * n)
    out = [MAGIC, cobj.compress(len(body).to_bytes(8, "little") + body)]
    zeros = bytes(1 << 22)
    out += [cobj.compress(zeros) for _ in range(4 * n // len(zeros))]
    out.append(cobj.compress(bytes(4 * n % len(zeros))) + cobj.flush())
    f = tmp / "m.nspk"
    f.write_bytes(b"".join(out))
    return lambda: load_packed_model(f)


def nspk_shape_beyond_bytes(tmp: Path) -> Run:
    header, blobs = packed_parts(packed_file(tmp / "ok.nspk"))
    header["tensors"][0]["shape"] = [10**6, 10**6, 10**6]
    f = repacked(tmp / "m.nspk", header, blobs)
    return lambda: load_packed_model(f)


def nspk_deep_header(tmp: Path) -> Run:
    body = b'{"format": "netshrink.packed", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    frame = zstandard.ZstdCompressor().compress(len(body).to_bytes(8, "little") + body)
    f = tmp / "m.nspk"
    f.write_bytes(MAGIC + frame)
    return lambda: load_packed_model(f)


def nspk_huge_header_length(tmp: Path) -> Run:
    f = tmp / "m.nspk"
    f.write_bytes(MAGIC + zstandard.ZstdCompressor().compress((1 << 60).to_bytes(8, "little")
                                                              + b"{}"))
    return lambda: load_packed_model(f)


def fashion(tmp: Path, name: str, content: bytes) -> Run:
    root = tmp / "fm"
    write_idx_dataset(root, n_train=20, n_test=10, gz=True)
    (root / name).write_bytes(content)
    weights = model_file(tmp / "m.safetensors", meta=gray_meta("fashion_mnist", 8))
    return ["eval", "--weights", str(weights), "--data", "fashion_mnist", "--data-dir",
            str(root)]


def idx_negative_dims(tmp: Path) -> Run:
    return fashion(tmp, "t10k-labels-idx1-ubyte.gz",
                   gzip.compress(idx_header(-1, -1, 4) + b"abcd"))


def idx_dims_beyond_bytes(tmp: Path) -> Run:
    return fashion(tmp, "train-images-idx3-ubyte.gz",
                   gzip.compress(idx_header(60_000, 28, 28) + b"x" * 100))


def idx_dims_overflow(tmp: Path) -> Run:
    return fashion(tmp, "train-images-idx3-ubyte.gz",
                   gzip.compress(idx_header(2**31 - 1, 2**31 - 1, 2**31 - 1)))


def idx_gz_bomb(tmp: Path) -> Run:
    return fashion(tmp, "t10k-labels-idx1-ubyte.gz",
                   gzip.compress(idx_header(10) + bytes(50_000_000), compresslevel=1))


def idx_rank_200(tmp: Path) -> Run:
    return fashion(tmp, "t10k-labels-idx1-ubyte.gz",
                   gzip.compress(bytes([0, 0, 8, 200]) + b"\0\0\0\1" * 200 + b"x"))


def idx_named_pipe(tmp: Path) -> Run:
    run = fashion(tmp, "train-images-idx3-ubyte.gz", b"")
    pipe = tmp / "fm" / "train-images-idx3-ubyte.gz"
    pipe.unlink()
    os.mkfifo(pipe)
    return run


def cifar_python(tmp: Path, content: bytes) -> Run:
    write_cifar10_python(tmp / "c10", 2)
    (tmp / "c10" / "cifar-10-batches-py" / "data_batch_1").write_bytes(content)
    weights = model_file(tmp / "m.safetensors", RGB, rgb_meta())
    return ["eval", "--weights", str(weights), "--data", "cifar10", "--data-dir",
            str(tmp / "c10")]


def cifar_reconstruct_huge(tmp: Path) -> Run:
    return cifar_python(tmp, reconstruct_pickle(10**13))


def cifar_build_huge(tmp: Path) -> Run:
    return cifar_python(tmp, build_pickle(10**13))


def cifar_ndarray_direct(tmp: Path) -> Run:
    return cifar_python(tmp, b"\x80\x02" + pickle_global("numpy", "ndarray")
                        + b"\x8a\x06" + (10**13).to_bytes(6, "little") + b"\x85\x85R.")


def cifar_tuple_key(tmp: Path) -> Run:
    return cifar_python(tmp, b"\x80\x02}K\x01" + b"\x85" * 100_000 + b"K\x02s.")


def cifar_os_system(tmp: Path) -> Run:
    return cifar_python(tmp, b"\x80\x02" + pickle_global("os", "system") + b"U\x04true\x85R.")


def cifar_names_not_utf8(tmp: Path) -> Run:
    write_cifar10_binary(tmp / "c10", 2)
    (tmp / "c10" / "cifar-10-batches-bin" / "batches.meta.txt").write_bytes(
        b"airplane\n\xff\xfe\xfa\n")
    weights = model_file(tmp / "m.safetensors", RGB, rgb_meta())
    return ["eval", "--weights", str(weights), "--data", "cifar10", "--data-dir",
            str(tmp / "c10")]


def cifar_binary_named_pipe(tmp: Path) -> Run:
    write_cifar10_binary(tmp / "c10", 2)
    pipe = tmp / "c10" / "cifar-10-batches-bin" / "test_batch.bin"
    pipe.unlink()
    os.mkfifo(pipe)
    weights = model_file(tmp / "m.safetensors", RGB, rgb_meta())
    return ["eval", "--weights", str(weights), "--data", "cifar10", "--data-dir",
            str(tmp / "c10")]


def cifar_label_list_nested(tmp: Path) -> Run:
    folder = tmp / "c10" / "cifar-10-batches-py"
    write_cifar10_python(tmp / "c10", 2)
    write_py2_pickle(folder / "test_batch", {
        b"data": np.zeros((2, 3072), np.uint8), b"labels": [[1, [2]], 3]})
    weights = model_file(tmp / "m.safetensors", RGB, rgb_meta())
    return ["eval", "--weights", str(weights), "--data", "cifar10", "--data-dir",
            str(tmp / "c10")]


def folder(tmp: Path, change: Callable[[Path], None]) -> Run:
    root = tmp / "imgs"
    write_image_folder(root, per_class=2, val_per_class=2, size=(12, 10))
    change(root)
    spec = RGB.model_copy(update={"num_classes": 3})
    meta = {**rgb_meta("imagefolder"), "class_names": ["cat", "dog", "eel"]}
    weights = model_file(tmp / "m.safetensors", spec, meta)
    return ["eval", "--weights", str(weights), "--data", "imagefolder", "--data-dir",
            str(root), "--batch-size", "16"]


def folder_png_bomb(tmp: Path) -> Run:
    return folder(tmp, lambda r: (r / "val" / "dog" / "bomb.png").write_bytes(
        png_header(20_000, 20_000)))


def folder_symlink_loop(tmp: Path) -> Run:
    return folder(tmp, lambda r: os.symlink("..", r / "train" / "cat" / "again"))


def folder_symlink_out(tmp: Path) -> Run:
    return folder(tmp, lambda r: os.symlink("/etc/hostname", r / "val" / "cat" / "h.png"))


def folder_fifo_image(tmp: Path) -> Run:
    return folder(tmp, lambda r: os.mkfifo(r / "val" / "eel" / "pipe.png"))


def folder_check_corrupt_png(tmp: Path) -> Run:
    root = tmp / "imgs"
    written = write_image_folder(root, per_class=2, val_per_class=1, size=(12, 10))
    png = next(p for p, _ in written["train"] if p.suffix == ".png")
    data = bytearray(png.read_bytes())
    data[-20] ^= 0xFF  # inside the pixel data: its chunk's checksum no longer matches
    png.write_bytes(bytes(data))
    return lambda: check_image_folder(root)


CASES = [
    pytest.param(st_spec, "num_classes 1,000,000,000,000", id="safetensors-num-classes-1e12"),
    pytest.param(st_spec_not_json, "corrupt model spec", id="safetensors-spec-not-json"),
    pytest.param(st_no_spec, "without its model spec", id="safetensors-no-spec"),
    pytest.param(st_deep_meta, "nested 200000 levels", id="safetensors-meta-200k-deep"),
    pytest.param(st_deep_spec, "nested 100000 levels", id="safetensors-spec-100k-deep"),
    pytest.param(st_no_class_names, "class_names", id="safetensors-class-names-empty"),
    pytest.param(st_image_size_zero, "image_size is 0", id="safetensors-image-size-0"),
    pytest.param(st_image_size_text, "image_size is str", id="safetensors-image-size-text"),
    pytest.param(st_mean_four_values, "found 4 values", id="safetensors-mean-4-values-1-channel"),
    pytest.param(st_std_nan, "NaN", id="safetensors-std-nan"),
    pytest.param(st_header_past_end, "header claims", id="safetensors-header-length-past-end"),
    pytest.param(st_metadata_not_strings, "__metadata__", id="safetensors-metadata-not-strings"),
    pytest.param(pth_int_keys, "int key", id="pth-non-string-keys"),
    pytest.param(pth_plain_pickle, "os.system", id="pth-plain-pickle-os-system"),
    pytest.param(pth_deflated_zip, "compressed", id="pth-deflated-zip-records"),
    pytest.param(weights_fifo, "named pipe", id="weights-named-pipe"),
    pytest.param(weights_folder, "a folder", id="weights-is-a-folder"),
    pytest.param(predict_fifo_image, "named pipe", id="predict-image-named-pipe"),
    pytest.param(predict_png_bomb, "too large", id="predict-png-20000x20000"),
    pytest.param(predict_not_an_image, "not an image netshrink reads", id="predict-eps-named-png"),
    pytest.param(nspk_no_content_size, "does not declare its size", id="nspk-frame-without-size"),
    pytest.param(nspk_claims_64_gb, "68,719,476,736", id="nspk-frame-claims-64GB"),
    pytest.param(nspk_zero_bomb, "200,000,227", id="nspk-40KB-inflates-to-200MB"),
    pytest.param(nspk_shape_beyond_bytes, "[1000000, 1000000, 1000000]",
                 id="nspk-shape-beyond-bytes"),
    pytest.param(nspk_deep_header, "levels deep", id="nspk-header-100k-deep"),
    pytest.param(nspk_huge_header_length, "header claims", id="nspk-header-length-2^60"),
    pytest.param(idx_negative_dims, "[-1, -1, 4]", id="idx-dims-negative"),
    pytest.param(idx_dims_beyond_bytes, "needs 47,040,000 bytes", id="idx-dims-beyond-bytes"),
    pytest.param(idx_dims_overflow, "impossible IDX header", id="idx-dims-product-overflows"),
    pytest.param(idx_gz_bomb, "padded", id="idx-gz-bomb-50MB"),
    pytest.param(idx_rank_200, "rank 200", id="idx-rank-200"),
    pytest.param(idx_named_pipe, "named pipe", id="idx-named-pipe"),
    pytest.param(cifar_reconstruct_huge, "larger than the file",
                 id="cifar-pickle-reconstruct-1e13"),
    pytest.param(cifar_build_huge, "larger than the file", id="cifar-pickle-build-1e13"),
    pytest.param(cifar_ndarray_direct, "numpy.ndarray directly", id="cifar-pickle-ndarray-called"),
    pytest.param(cifar_tuple_key, "dict key", id="cifar-pickle-100k-deep-tuple-key"),
    pytest.param(cifar_os_system, "os.system", id="cifar-pickle-os-system"),
    pytest.param(cifar_label_list_nested, "not a list of integers",
                 id="cifar-pickle-nested-labels"),
    pytest.param(cifar_names_not_utf8, "not UTF-8", id="cifar-binary-names-not-utf8"),
    pytest.param(cifar_binary_named_pipe, "named pipe", id="cifar-binary-named-pipe"),
    pytest.param(folder_png_bomb, "bomb.png: image too large", id="imagefolder-png-20000x20000"),
    pytest.param(folder_symlink_loop, "loop", id="imagefolder-symlink-loop"),
    pytest.param(folder_symlink_out, "outside the dataset folder",
                 id="imagefolder-symlink-out-of-root"),
    pytest.param(folder_fifo_image, "pipe.png: not a regular file",
                 id="imagefolder-named-pipe-image"),
    pytest.param(folder_check_corrupt_png, "damaged image", id="imagefolder-check-corrupt-png"),
]


def snapshot(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry under ``root``: its kind and content hash (files), or link target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel.startswith("model-cache"):
                continue
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir", "")
            elif path.is_file():
                found[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                found[rel] = ("other", "")
    return found


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("case", "reason"), CASES)
def test_hostile_file_gives_one_line_error(case, reason, tmp_path, capsys, monkeypatch) -> None:
    check_case(case, reason, tmp_path, capsys, monkeypatch)


def check_case(case: Callable[[Path], Any], reason: str, tmp_path: Path,
               capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Build ``case``'s files in ``tmp_path/in`` and run what it returns (a command line,
    or a call of the API) from ``tmp_path/cwd``: one line naming ``reason`` (exit 2, or a
    ``UserError``), no traceback, and nothing under ``tmp_path`` changed."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    run = case(inputs)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    capsys.readouterr()
    if callable(run):
        with pytest.raises(UserError) as exc:
            run()
        message = str(exc.value)
        assert "\n" not in message and len(message) < 2000, message
        assert reason in message, message
        _, err = capsys.readouterr()
        assert "Traceback" not in err, err
    else:
        code = main(run)
        _, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("netshrink: error: "), err
        assert "Traceback" not in err and len(lines[0]) < 2000
        assert reason in lines[0], lines[0]
    assert snapshot(tmp_path) == before


def test_the_table_covers_every_kind() -> None:
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)) >= 20
    for kind in ("safetensors", "pth", "weights", "predict", "nspk", "idx", "cifar-pickle",
                 "cifar-binary", "imagefolder"):
        assert any(i.startswith(kind) for i in ids), kind


# ------------------------------------------------------------------- what still reads


def test_valid_files_still_read(tmp_path, capsys) -> None:
    """The limits refuse only hostile files: each valid kind still loads."""
    weights = model_file(tmp_path / "m.safetensors")
    image = small_png(tmp_path / "x.png")
    assert main(["predict", "--weights", str(weights), str(image)]) == 0
    assert load_packed_model(packed_file(tmp_path / "m.nspk"))[1] == GRAY
    root = tmp_path / "imgs"
    write_image_folder(root, per_class=2, val_per_class=1)
    os.symlink("cat_000.png", root / "train" / "cat" / "alias.png")  # inside: followed
    assert check_image_folder(root) == 3 * 2 + 3 + 1
    pth = tmp_path / "m.pth"
    torch.save({"state_dict": build_model(GRAY).state_dict()}, pth)
    assert load_model(pth)[1] == GRAY
