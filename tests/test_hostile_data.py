"""Hostile data: files and data settings that would make netshrink allocate without bound.

Images whose header passes every check but whose shape is absurd (a 2,986-byte PNG of
3,000,000 x 1 pixels), ``data.image_size`` and batch sizes far beyond any real use, IDX
headers that declare gigabytes, CIFAR pickles of millions of opcodes, image folders of
more classes or files than the bounds. One table: each case builds its files in the
test's own folder and names the command; every case must end the same way: exit 2, one
line ``netshrink: error: ...`` naming the problem (the ``reason`` part of the case), no
traceback, and no byte changed anywhere under the test's folder (a run is refused before
``run.json`` or ``stages/`` exist). Then the fuzzing of the image and IDX readers: any
header or mutated byte gives a result or a ``UserError``, never another exception.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from PIL import Image

from fixtures_data import write_cifar10_binary, write_cifar10_python, write_image_folder
from netshrink.data.bounds import check_image_shape
from netshrink.data.idx import read_fashion_mnist, read_idx
from netshrink.data.imagefolder import FileSplit
from netshrink.data.images import check_image
from netshrink.errors import UserError
from netshrink.predict import load_image
from test_fuzz_readers import FAST, SLOW, fuzz, mutated
from test_hostile_readers import RGB, gray_meta, model_file, rgb_meta
from test_hostile_runs import TINY, assert_refused_untouched

# ------------------------------------------------------------------ crafted images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_strip(width: int, height: int, color: int = 0) -> bytes:
    """A complete, valid PNG of ``width`` x ``height`` black pixels (gray or RGB): every
    check a header or checksum allows passes; only the shape is absurd."""
    channels = 1 if color == 0 else 3
    body = zlib.compress((b"\0" + bytes(width * channels)) * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body)
            + _chunk(b"IEND", b""))


FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


def small_image(fmt: str, size: tuple[int, int] = (6, 4)) -> bytes:
    """A real ``fmt`` file of ``size`` pixels (random RGB)."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def _tiff_dims(data: bytearray, width: int, height: int) -> None:
    little = data[:2] == b"II"
    end = "<" if little else ">"
    (ifd,) = struct.unpack(end + "I", data[4:8])
    (count,) = struct.unpack(end + "H", data[ifd : ifd + 2])
    for i in range(count):
        at = ifd + 2 + 12 * i
        tag = struct.unpack(end + "H", data[at : at + 2])[0]
        if tag in (256, 257):  # ImageWidth, ImageLength: make them LONG
            value = width if tag == 256 else height
            data[at + 2 : at + 12] = struct.pack(end + "HII", 4, 1, value & 0xFFFFFFFF)


def with_dims(fmt: str, width: int, height: int) -> bytes:
    """A real small ``fmt`` file whose header is rewritten to claim ``width`` x ``height``
    (each clipped to what the format can say); the pixel data stays that of 6 x 4."""
    data = bytearray(small_image(fmt))
    if fmt == "PNG":
        data[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    elif fmt == "JPEG":
        at = data.index(b"\xff\xc0")
        data[at + 5 : at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    elif fmt == "GIF":
        data[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
        table = 3 * 2 ** ((data[10] & 7) + 1) if data[10] & 0x80 else 0
        at = 13 + table
        while data[at] != 0x2C:  # skip extension blocks to the image descriptor
            at += 2
            while data[at]:
                at += data[at] + 1
            at += 1
        data[at + 5 : at + 9] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", width & 0x7FFFFFFF, height & 0x7FFFFFFF)
    elif fmt == "TIFF":
        _tiff_dims(data, width, height)
    elif fmt == "WEBP":
        at = data.index(b"VP8 ") + 8 + 6  # the frame's 14-bit width and height
        data[at : at + 4] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    else:  # PPM
        head_end = data.index(b"255\n") + 4
        data = bytearray(f"P6\n{width} {height}\n255\n".encode()) + data[head_end:]
    return bytes(data)


# ------------------------------------------------------------------ the table


@dataclass
class Env:
    """The folder a case builds in, the test dataset, and the environment to set."""

    tmp: Path
    fashion: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def file(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def recipe(self, raw: dict) -> str:
        return self.file("r.yaml", json.dumps(raw).encode())

    def tiny(self, **data: object) -> dict:
        raw = json.loads(json.dumps(TINY))
        raw["data"]["root"] = str(self.fashion)
        raw["data"].update(data)
        return raw

    def gray_model(self) -> str:
        return str(model_file(self.tmp / "gray.safetensors"))

    def rgb224_model(self) -> str:
        return str(model_file(self.tmp / "rgb.safetensors", RGB, rgb_meta(image_size=224)))

    def folder(self, split: str, name: str, data: bytes) -> Path:
        """An image folder (3 classes) with ``name`` holding ``data`` in ``split``/dog."""
        root = self.tmp / "imgs"
        write_image_folder(root, per_class=2, val_per_class=1, size=(12, 10))
        (root / split / "dog" / name).write_bytes(data)
        return root

    def folder_run(self, root: Path, **data: object) -> list[str]:
        raw = self.tiny()
        raw["model"]["stem"] = "cifar"
        raw["data"] = {"name": "imagefolder", "root": str(root), "image_size": 16,
                       "val_size": 0, "calib_size": 2, "num_workers": 0, **data}
        return ["run", self.recipe(raw), "--out", str(self.out)]

    def fashion_copy(self, name: str | None = None, data: bytes = b"") -> list[str]:
        """Fashion-MNIST with the file ``name`` (if any) holding ``data``, evaluated."""
        root = self.tmp / "fm"
        root.mkdir()
        for path in self.fashion.iterdir():
            (root / path.name).write_bytes(path.read_bytes())
        if name is not None:  # a plain file is found before the .gz of the same name
            (root / name).write_bytes(data)
        weights = model_file(self.tmp / "fm.safetensors", meta=gray_meta("fashion_mnist", 28))
        return ["eval", "--weights", str(weights), "--data-dir", str(root)]

    def cifar_python(self, data: bytes) -> list[str]:
        write_cifar10_python(self.tmp / "c10", 2)
        (self.tmp / "c10" / "cifar-10-batches-py" / "data_batch_1").write_bytes(data)
        return ["eval", "--weights", str(model_file(self.tmp / "c.safetensors", RGB,
                                                    rgb_meta())),
                "--data", "cifar10", "--data-dir", str(self.tmp / "c10")]


def idx_head(*dims: int) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}i", *dims)


Case = tuple[Callable[[Env], list[str]], str]


def _predict(image: Callable[[], bytes], name: str, model: str = "gray") -> Case:
    def build(env: Env) -> list[str]:
        weights = env.gray_model() if model == "gray" else env.rgb224_model()
        return ["predict", "--weights", weights, env.file(name, image())]
    return build, "pixels"


def _predict_env(variable: str, value: str, reason: str) -> Case:
    def build(env: Env) -> list[str]:
        env.monkeypatch.setenv(variable, value)
        return ["predict", "--weights", env.gray_model(),
                env.file("ok.png", small_image("PNG"))]
    return build, reason


def _folder_case(split: str, data: Callable[[], bytes], reason: str, name: str = "x.png",
                 **settings: object) -> Case:
    def build(env: Env) -> list[str]:
        return env.folder_run(env.folder(split, name, data()), **settings)
    return build, reason


def _eval_folder_strip(env: Env) -> list[str]:
    # eval decodes lazily (no up-front folder check): the loader itself refuses.
    root = env.folder("val", "strip.png", png_strip(3_000_000, 1))
    spec = RGB.model_copy(update={"num_classes": 3})
    meta = {**rgb_meta("imagefolder"), "class_names": ["cat", "dog", "eel"]}
    weights = model_file(env.tmp / "m3.safetensors", spec, meta)
    return ["eval", "--weights", str(weights), "--data", "imagefolder", "--data-dir",
            str(root), "--batch-size", "4"]


def _bound_lowered(variable: str, value: str, reason: str) -> Case:
    """A bound lowered below a small real folder: the mechanism a million entries hit."""
    def build(env: Env) -> list[str]:
        env.monkeypatch.setenv(variable, value)
        root = env.tmp / "imgs"
        write_image_folder(root, classes=("a", "b", "c", "d"), per_class=2, val_per_class=1,
                           size=(12, 10))
        return env.folder_run(root)
    return build, reason


def _recipe(reason: str, **data: object) -> Case:
    def build(env: Env) -> list[str]:
        return ["run", env.recipe(env.tiny(**data)), "--out", str(env.out)]
    return build, reason


def _stage_batch(env: Env) -> list[str]:
    # The eval batch is 1 (it passes); the training batch, 550 images at 2048 px, not.
    raw = env.tiny(image_size=2048, batch_size=1, train_limit=None)
    raw["stages"][0]["batch_size"] = 100_000
    return ["run", env.recipe(raw), "--out", str(env.out)]


def _idx(name: str, data: Callable[[], bytes], reason: str) -> Case:
    def build(env: Env) -> list[str]:
        return env.fashion_copy(name, data())
    return build, reason


def _idx_bound_lowered(env: Env) -> list[str]:
    env.monkeypatch.setenv("NETSHRINK_MAX_IDX_BYTES", "1000")
    return env.fashion_copy()


def _size_variable_junk(env: Env) -> list[str]:
    env.monkeypatch.setenv("NETSHRINK_MAX_IMAGE_SIZE", "2k")
    return ["run", env.recipe(env.tiny(image_size=64)), "--out", str(env.out)]


def _cifar(data: Callable[[], bytes], reason: str) -> Case:
    def build(env: Env) -> list[str]:
        return env.cifar_python(data())
    return build, reason


def _cifar_sparse(binary: bool) -> Case:
    def build(env: Env) -> list[str]:
        writer = write_cifar10_binary if binary else write_cifar10_python
        writer(env.tmp / "c10", 2)
        folder = env.tmp / "c10" / ("cifar-10-batches-bin" if binary else "cifar-10-batches-py")
        with (folder / ("data_batch_1.bin" if binary else "data_batch_1")).open("r+b") as f:
            f.truncate(257 << 20)  # sparse: past the 256 MB bound on paper, nothing on disk
        return ["eval", "--weights", str(model_file(env.tmp / "c.safetensors", RGB,
                                                    rgb_meta())),
                "--data", "cifar10", "--data-dir", str(env.tmp / "c10")]
    return build, "bytes"


CASES: dict[str, Case] = {
    # item 1: images whose header passes every check, with an absurd shape
    "predict-png-3000000x1-2986-bytes": _predict(lambda: png_strip(3_000_000, 1), "w.png"),
    "predict-png-1x3000000": _predict(lambda: png_strip(1, 3_000_000), "t.png"),
    "predict-png-3000000x1-rgb224-model": _predict(
        lambda: with_dims("PNG", 3_000_000, 1), "h.png", model="rgb"),
    "predict-png-51-to-1": _predict(lambda: with_dims("PNG", 5100, 100), "s.png"),
    "predict-png-150-megapixels": _predict(lambda: with_dims("PNG", 12_500, 12_000), "m.png"),
    "predict-png-past-pillows-own-bound": (
        _predict(lambda: with_dims("PNG", 20_000, 20_000), "b.png")[0], "too large"),
    "predict-jpeg-65535x1": _predict(lambda: with_dims("JPEG", 65_535, 1), "j.jpg"),
    "predict-gif-65535x1": _predict(lambda: with_dims("GIF", 65_535, 1), "g.gif"),
    "predict-bmp-3000000x1": _predict(lambda: with_dims("BMP", 3_000_000, 1), "b.bmp"),
    "predict-tiff-3000000x1": _predict(lambda: with_dims("TIFF", 3_000_000, 1), "t.tif"),
    "predict-webp-16383x1": _predict(lambda: with_dims("WEBP", 16_383, 1), "w.webp"),
    "predict-ppm-3000000x1": _predict(lambda: with_dims("PPM", 3_000_000, 1), "p.ppm"),
    "predict-bound-variable-not-a-number": _predict_env(
        "NETSHRINK_MAX_IMAGE_ASPECT", "fifty", "expected a whole number"),
    "predict-bound-variable-zero": _predict_env(
        "NETSHRINK_MAX_IMAGE_PIXELS", "0", "expected a whole number"),
    "run-folder-strip-in-val": _folder_case("val", lambda: png_strip(3_000_000, 1), "pixels"),
    "run-folder-strip-in-train": _folder_case("train", lambda: png_strip(1, 3_000_000),
                                              "pixels"),
    "run-folder-150-megapixels-in-val": _folder_case(
        "val", lambda: with_dims("PNG", 12_500, 12_000), "pixels"),
    "run-folder-jpeg-strip-in-val": _folder_case(
        "val", lambda: with_dims("JPEG", 65_535, 2), "pixels", name="x.JPEG"),
    "eval-folder-strip-lazy-loader": (_eval_folder_strip, "pixels"),
    # item 2: data.image_size and the batches it makes
    "recipe-image-size-4096": _recipe("data.image_size 4,096", image_size=4096),
    "recipe-image-size-1e30": _recipe("data.image_size", image_size=10**30),
    "recipe-image-size-2048-default-batch": _recipe("data.batch_size 256",
                                                    image_size=2048),
    "recipe-stage-batch-100000-at-2048": (_stage_batch, "stages[0] (train): batch_size"),
    "recipe-image-size-variable-junk": (_size_variable_junk, "NETSHRINK_MAX_IMAGE_SIZE"),
    "recipe-num-workers-100000": _recipe("data.num_workers 100,000", num_workers=100_000),
    "recipe-data-seed-2-to-the-70": _recipe("data.seed", seed=2**70),
    # item 3: IDX headers checked before any data is read or inflated
    "idx-gz-declares-2-gb": _idx("train-images-idx3-ubyte.gz",
                                 lambda: gzip.compress(idx_head(2_700_000, 28, 28)),
                                 "NETSHRINK_MAX_IDX_BYTES"),
    "idx-gz-declares-more-than-it-can-hold": _idx(
        "train-images-idx3-ubyte.gz",
        lambda: gzip.compress(idx_head(90_000, 28, 28) + bytes(1000)), "cannot hold"),
    "idx-plain-declares-more-than-the-file": _idx(
        "t10k-images-idx3-ubyte", lambda: idx_head(60_000, 28, 28) + bytes(100), "found 100"),
    "idx-gz-padded-by-a-10mb-bomb": _idx(
        "t10k-images-idx3-ubyte.gz",
        lambda: gzip.compress(idx_head(200, 28, 28) + bytes(200 * 784 + 10_000_000),
                              compresslevel=1), "padded"),
    "idx-images-not-28x28": _idx("train-images-idx3-ubyte.gz",
                                 lambda: gzip.compress(idx_head(2, 1, 1_000_000)),
                                 "expected [N, 28, 28]"),
    "idx-labels-of-rank-2": _idx("train-labels-idx1-ubyte.gz",
                                 lambda: gzip.compress(idx_head(600, 1) + bytes(600)),
                                 "expected [N]"),
    "idx-bound-lowered": (_idx_bound_lowered, "NETSHRINK_MAX_IDX_BYTES"),
    # items 3-4: CIFAR and image-folder listings
    "cifar-pickle-600k-empty-lists": _cifar(lambda: b"\x80\x02(" + b"]" * 600_000 + b"l.",
                                            "pickle operations"),
    "cifar-binary-batch-257mb": _cifar_sparse(binary=True),
    "run-folder-more-classes-than-the-bound": _bound_lowered(
        "NETSHRINK_MAX_CLASSES", "3", "more than 3 class folders"),
    "run-folder-more-files-than-the-bound": _bound_lowered(
        "NETSHRINK_MAX_IMAGE_FILES", "5", "more than 5"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_data_is_refused_and_nothing_changes(
    case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, fashion_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = Env(tmp_path / "case", fashion_dir, monkeypatch)
    env.tmp.mkdir()
    monkeypatch.chdir(env.tmp)
    build, reason = CASES[case]
    line = assert_refused_untouched(build(env), capsys, tmp_path)  # no run.json, no stages/
    assert reason in line, line
    assert not env.out.exists()


def test_the_table_covers_the_issue() -> None:
    assert len(CASES) >= 30
    for prefix in ("predict-", "run-folder-", "eval-folder-", "recipe-", "idx-", "cifar-"):
        assert any(name.startswith(prefix) for name in CASES), prefix


# ------------------------------------------------------------------ what stays allowed


def test_the_issue_strip_is_the_issue_size() -> None:
    assert len(png_strip(3_000_000, 1)) == 2986


@pytest.mark.parametrize("fmt", FORMATS)
def test_crafted_headers_claim_what_they_say(fmt: str, tmp_path: Path) -> None:
    """The crafting helpers really rewrite each format's header (else the table would
    test nothing): Pillow reads the claimed size back."""
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(with_dims(fmt, 300, 7))
    with Image.open(path) as img:
        assert img.size == (300, 7)


@pytest.mark.parametrize(("size", "ok"), [
    ((12_000, 9_000), True),  # a 108-megapixel phone photo
    ((16_384, 8_192), True),  # a stitched panorama
    ((5_000, 100), True),  # 50:1
    ((5_001, 100), False),
    ((12_500, 12_000), False),  # 150 megapixels
    ((0, 5), False),
])
def test_the_image_bounds_pass_real_photos(size: tuple[int, int], ok: bool) -> None:
    assert (check_image_shape(*size) is None) == ok


def test_predict_refuses_a_model_image_size_beyond_the_bound(tmp_path: Path) -> None:
    # A model file may say up to 4096 (its own bound); netshrink decodes to at most 2048.
    path = tmp_path / "ok.png"
    path.write_bytes(small_image("PNG"))
    with pytest.raises(UserError, match="the model's image_size 3,000 is more than"):
        load_image(path, in_channels=1, size=3000)


def test_bounds_are_raised_by_their_variables(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "strip.png"
    path.write_bytes(png_strip(300, 2))
    with pytest.raises(UserError, match="NETSHRINK_MAX_IMAGE_ASPECT"):
        load_image(path, in_channels=1, size=8)
    monkeypatch.setenv("NETSHRINK_MAX_IMAGE_ASPECT", "200")
    assert load_image(path, in_channels=1, size=8).shape == (1, 8, 8)


def test_a_long_image_within_the_bounds_is_never_resized_whole(tmp_path: Path) -> None:
    """At 50:1 and 1024 px, resizing the shorter side first would make a 1024 x 51,200
    image (157 MB as RGB); only the crop's box is resized."""
    path = tmp_path / "long.png"
    path.write_bytes(png_strip(2500, 50, color=2))
    x = load_image(path, in_channels=3, size=1024)
    assert x.shape == (3, 1024, 1024)
    split = FileSplit([path], torch.zeros(1, dtype=torch.int64), image_size=1024,
                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    for augment in (False, True):
        images, _ = next(split.batches(1, augment=augment))
        assert images.shape == (1, 3, 1024, 1024)


def test_eval_transform_of_ordinary_images_is_unchanged() -> None:
    """The whole resize stays for ordinary images: the same pixels as resizing the
    shorter side to 256/224 of the size and centre-cropping, as before."""
    from netshrink.data.images import eval_transform

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 500, 3),
                                                           dtype=np.uint8))
    want = img.resize((426, 256), Image.Resampling.BILINEAR).crop((101, 16, 325, 240))
    assert np.array_equal(np.asarray(eval_transform(img, 224)), np.asarray(want))


def test_idx_gzip_is_inflated_only_as_far_as_the_header_says(tmp_path: Path) -> None:
    """A 200 MB bomb after a 10-label header: refused as padded after inflating 10 bytes
    and a few more, not 200 MB (the fuzz harness's memory bound would catch that too)."""
    path = tmp_path / "labels-idx1-ubyte.gz"
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = packer.compress(idx_head(10) + bytes(10))
    body += b"".join(packer.compress(bytes(1 << 20)) for _ in range(200)) + packer.flush()
    path.write_bytes(body)
    with pytest.raises(UserError, match=r"found 26\+"):
        read_idx(path, dims=(None,))


def test_fashion_reads_without_a_second_copy(fashion_dir: Path) -> None:
    raw = read_fashion_mnist(fashion_dir)
    assert raw.train_images.shape[1:] == (1, 28, 28)
    assert raw.train_images.is_contiguous()


# ------------------------------------------------------------------ fuzzing

big_dim = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1),
                    st.sampled_from([0, 1, 2, 49, 51, 3_000_000, 65_535, 65_536, 16_383,
                                     2**31 - 1, 2**32 - 1]))


@st.composite
def claimed_image(draw) -> tuple[str, bytes]:
    """A real small file of some format whose header claims any width and height, then
    maybe mutated, cut short or extended."""
    fmt = draw(st.sampled_from(FORMATS))
    data = with_dims(fmt, draw(big_dim), draw(big_dim))
    if draw(st.booleans()):
        data = draw(mutated(data))
    return fmt, data


def _image_readers(path: Path, size: int) -> None:
    """What a file given to netshrink goes through: the up-front check, predict's
    decoding, and the lazy loader with both transforms. A warning is an error here: on
    the command line it would be a second line on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with contextlib.suppress(UserError):
            check_image(path)
        with contextlib.suppress(UserError):
            load_image(path, in_channels=3, size=size)
        split = FileSplit([path], torch.zeros(1, dtype=torch.int64), image_size=size,
                          mean=(0.5,), std=(0.25,), mode="L")
        for augment in (False, True):
            next(split.batches(1, augment=augment))


@st.composite
def fashion_idx(draw) -> tuple[str, bytes, bool, bool, list[tuple[int, int]], int | None]:
    """One of the four Fashion-MNIST files with its real header or any other (rank, dims,
    declared size) and a body of zeros of about that size; then what ``build_idx`` does
    to it: a 5 MB bomb appended or not, gzipped or not, bytes of its first 4 KB changed,
    cut short.

    The large bytes are made in ``build_idx``, outside hypothesis (which keeps what it
    draws: 5 MB bodies drawn here grew the test process by gigabytes)."""
    name = draw(st.sampled_from(["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]))
    real = [600 if name.startswith("train") else 200] + ([28, 28] if "images" in name else [])
    dims = draw(st.one_of(st.just(real), st.lists(
        st.one_of(st.integers(0, 40), st.just(28), st.integers(-(2**31), 2**31 - 1)),
        min_size=0, max_size=4)))
    head = bytes([0, 0, draw(st.sampled_from([8, 8, 9])), len(dims)])
    head += struct.pack(f">{len(dims)}i", *dims)
    count = int(np.prod(dims)) if dims and all(0 <= d <= 600 for d in dims) else 0
    raw = head + bytes(max(0, min(count, 500_000) + draw(st.sampled_from([0, 0, -1, 1]))))
    changes = draw(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)),
                            max_size=draw(st.sampled_from([0, 0, 8]))))
    cut = draw(st.one_of(st.none(), st.integers(0, 4096)))
    return name, raw, draw(st.booleans()), draw(st.booleans()), changes, cut


def build_idx(value: tuple[str, bytes, bool, bool, list[tuple[int, int]], int | None]
              ) -> tuple[str, bytes]:
    """The file name and bytes ``fashion_idx`` describes."""
    name, raw, bomb, gz, changes, cut = value
    if bomb:
        raw += bytes(5_000_000)
    if gz:
        raw, name = gzip.compress(raw, compresslevel=1), name + ".gz"
    data = bytearray(raw)
    for where, byte in changes:
        if data:
            data[where % min(len(data), 4096)] = byte
    if cut is not None:
        data = data[: min(cut, len(data))]
    return name, bytes(data)


def fuzz_readers(work: Path, fashion: Path) -> dict:
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)

    def image(value: tuple[str, bytes]) -> None:
        fmt, data = value
        path = images / f"x.{fmt.lower()}"
        path.write_bytes(data)
        _image_readers(path, 8)

    root = work / "fm"
    if not root.exists():
        root.mkdir()
        for path in fashion.iterdir():
            (root / path.name).write_bytes(path.read_bytes())
    originals = {p.name: p.read_bytes() for p in root.iterdir()}

    def idx(value: tuple) -> None:
        name, data = build_idx(value)
        for stem in (name, name + ".gz", name.removesuffix(".gz")):
            (root / stem).unlink(missing_ok=True)
        (root / name).write_bytes(data)
        try:
            read_fashion_mnist(root)
        finally:
            (root / name).unlink()
            original = name.removesuffix(".gz") + ".gz"
            (root / original).write_bytes(originals[original])

    return {"image-headers": (claimed_image(), image), "fashion-idx": (fashion_idx(), idx)}


FUZZED = ["image-headers", "fashion-idx"]


@pytest.mark.parametrize("name", FUZZED)
def test_fuzz_data_reader(name: str, tmp_path: Path, fashion_dir: Path) -> None:
    strategy, check = fuzz_readers(tmp_path, fashion_dir)[name]
    fuzz(name, strategy, check, FAST // 2)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", FUZZED)
def test_fuzz_data_reader_slow(name: str, tmp_path: Path, fashion_dir: Path) -> None:
    strategy, check = fuzz_readers(tmp_path, fashion_dir)[name]
    fuzz(name, strategy, check, SLOW)


def test_fuzz_inputs_reach_the_decoder(tmp_path: Path) -> None:
    """The crafted files are real files of each format: unmutated and of a sane size
    they decode, so the fuzz exercises the decoders and not only the header checks."""
    for fmt in FORMATS:
        path = tmp_path / f"x.{fmt.lower()}"
        path.write_bytes(small_image(fmt))
        _image_readers(path, 8)
    assert os.path.getsize(path) > 0
