"""Dataset readers and splits, on tiny files written in the real on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_data import (
    write_cifar10_binary,
    write_cifar10_python,
    write_cifar100_binary,
    write_cifar100_python,
    write_idx,
    write_idx_dataset,
    write_image_folder,
    write_py2_pickle,
)
from netshrink.data import ArraySplit, Augment, DataConfig, build_data
from netshrink.data.cifar import read_cifar10, read_cifar100
from netshrink.data.digits import read_digits
from netshrink.data.idx import read_fashion_mnist
from netshrink.data.imagefolder import FileSplit
from netshrink.data.images import eval_transform, random_resized_crop
from netshrink.errors import UserError


def _keys(images: torch.Tensor) -> list[bytes]:
    """One hashable key per image, to tell which images a split holds."""
    return [img.numpy().tobytes() for img in images]


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reads_what_was_written(tmp_path: Path, gz: bool) -> None:
    written = write_idx_dataset(tmp_path, n_train=30, n_test=10, gz=gz)
    raw = read_fashion_mnist(tmp_path)
    assert raw.train_images.shape == (30, 1, 28, 28) and raw.train_images.dtype == torch.uint8
    assert raw.test_images.shape == (10, 1, 28, 28)
    assert raw.train_labels.dtype == torch.int64
    np.testing.assert_array_equal(raw.train_images.numpy(), written.train_images)
    np.testing.assert_array_equal(raw.train_labels.numpy(), written.train_labels)
    np.testing.assert_array_equal(raw.test_labels.numpy(), written.test_labels)
    assert len(raw.class_names) == 10


def test_build_data_splits_are_disjoint_and_deterministic(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=60, n_test=20)

    def build(seed: int):
        return build_data(DataConfig(name="fashion_mnist", root=tmp_path, val_size=12,
                                     calib_size=8, seed=seed))

    bundle = build(0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test), len(bundle.calib)) == \
        (48, 12, 20, 8)
    assert bundle.info.num_classes == 10 and bundle.info.in_channels == 1
    train, val, calib = (set(_keys(s.images)) for s in (bundle.train, bundle.val, bundle.calib))
    assert not train & val  # validation is held out of training
    assert calib <= train  # calibration is drawn from training, never from val/test
    again = build(0)
    assert _keys(again.val.images) == _keys(bundle.val.images)
    assert _keys(again.calib.images) == _keys(bundle.calib.images)
    assert set(_keys(build(1).val.images)) != val
    x, y = next(bundle.test.batches(7))
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_build_data_without_val(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=20, n_test=5, gz=False)
    bundle = build_data(DataConfig(root=tmp_path, val_size=0, calib_size=50))
    assert bundle.val is None and len(bundle.train) == 20 and len(bundle.calib) == 20


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_names_the_file(tmp_path: Path, gz: bool) -> None:
    write_idx_dataset(tmp_path, n_train=10, n_test=5, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    raw = raw[:-100]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(UserError, match="truncated") as exc:
        read_fashion_mnist(tmp_path)
    assert name in str(exc.value)


def test_idx_wrong_magic_and_type(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=10, n_test=5, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x01\x02" + path.read_bytes()[2:])
    with pytest.raises(UserError, match="not an IDX file") as exc:
        read_fashion_mnist(tmp_path)
    assert path.name in str(exc.value)
    write_idx(path, np.zeros(5, np.uint8))
    path.write_bytes(path.read_bytes()[:2] + b"\x0d" + path.read_bytes()[3:])  # float type
    with pytest.raises(UserError, match="unsigned byte"):
        read_fashion_mnist(tmp_path)


def test_idx_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--data-dir"):
        read_fashion_mnist(tmp_path / "nowhere")
    write_idx_dataset(tmp_path, n_train=10, n_test=5)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte"):
        read_fashion_mnist(tmp_path)


# --------------------------------------------------------------------------- CIFAR


def _assert_same(raw, written) -> None:
    assert raw.train_images.dtype == torch.uint8 and raw.train_labels.dtype == torch.int64
    np.testing.assert_array_equal(raw.train_images.numpy(), written.train_images)
    np.testing.assert_array_equal(raw.train_labels.numpy(), written.train_labels)
    np.testing.assert_array_equal(raw.test_images.numpy(), written.test_images)
    np.testing.assert_array_equal(raw.test_labels.numpy(), written.test_labels)
    assert raw.class_names == written.class_names


@pytest.mark.parametrize("writer", [write_cifar10_python, write_cifar10_binary])
def test_cifar10_both_formats_from_parent_or_folder(tmp_path: Path, writer) -> None:
    written = writer(tmp_path, 4, 6)
    raw = read_cifar10(tmp_path)
    assert raw.train_images.shape == (20, 3, 32, 32) and raw.test_images.shape == (6, 3, 32, 32)
    _assert_same(raw, written)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    _assert_same(read_cifar10(folder), written)  # the extracted folder itself


@pytest.mark.parametrize("writer", [write_cifar100_python, write_cifar100_binary])
def test_cifar100_both_formats_use_fine_labels(tmp_path: Path, writer) -> None:
    written = writer(tmp_path, 120, 30)
    raw = read_cifar100(tmp_path)
    assert raw.train_images.shape == (120, 3, 32, 32) and len(raw.class_names) == 100
    assert int(raw.train_labels.max()) > 19  # fine (0..99), not coarse (0..19)
    _assert_same(raw, written)


def test_cifar_python_with_str_keys(tmp_path: Path) -> None:
    """Files re-saved by Python 3 (str keys, protocol 4) read too."""
    written = write_cifar10_python(tmp_path, 2)
    folder = tmp_path / "cifar-10-batches-py"
    for path in folder.iterdir():
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")
        with path.open("wb") as f:
            pickle.dump({k.decode(): v for k, v in obj.items()}, f, protocol=4)
    _assert_same(read_cifar10(tmp_path), written)


def test_build_data_cifar10(tmp_path: Path) -> None:
    write_cifar10_binary(tmp_path, 10, 8)
    bundle = build_data(DataConfig(name="cifar10", root=tmp_path, val_size=10, calib_size=4))
    assert bundle.info.num_classes == 10 and bundle.info.in_channels == 3
    assert bundle.info.image_size == 32 and bundle.info.class_names[0] == "airplane"
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 8)
    x, _ = next(bundle.train.batches(16, shuffle=True, augment=True, seed=3))
    assert x.shape == (16, 3, 32, 32)


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    write_cifar10_python(tmp_path, 2)
    victim = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    marker = tmp_path / "pwned.txt"
    # Written like the real batches, so the only foreign thing in it is the exploit.
    write_py2_pickle(victim, {b"data": _Exploit(marker), b"labels": [0]})
    with pytest.raises(UserError, match=r"refusing to unpickle .*system") as exc:
        read_cifar10(tmp_path)
    assert "data_batch_1" in str(exc.value) and "not a CIFAR batch" in str(exc.value)
    assert not marker.exists()


def test_broken_pickle_names_the_file(tmp_path: Path) -> None:
    write_cifar10_python(tmp_path, 2)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="test_batch"):
        read_cifar10(tmp_path)


def test_truncated_cifar_bin_names_file_and_sizes(tmp_path: Path) -> None:
    write_cifar10_binary(tmp_path, 3, 3)
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError) as exc:
        read_cifar10(tmp_path)
    message = str(exc.value)
    assert "data_batch_3.bin" in message and "3073" in message
    assert str(3 * 3073 - 10) in message


def test_cifar_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cifar-10-python\.tar\.gz.*--data-dir"):
        read_cifar10(tmp_path)
    with pytest.raises(UserError, match=r"cifar-100-python\.tar\.gz"):
        read_cifar100(tmp_path / "absent")
    write_cifar10_python(tmp_path, 2)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(UserError, match=r"batches\.meta"):
        read_cifar10(tmp_path)


# --------------------------------------------------------------------------- digits


def test_digits() -> None:
    raw = read_digits(None)
    n_train, n_test = len(raw.train_labels), len(raw.test_labels)
    assert n_train + n_test == 1797 and n_test == 359
    assert raw.train_images.shape == (n_train, 1, 8, 8) and raw.train_images.dtype == torch.uint8
    assert int(raw.train_images.max()) == 255 and int(raw.train_images.min()) == 0
    assert raw.class_names == [str(d) for d in range(10)]
    assert raw.test_labels.bincount().tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    again = read_digits(Path("ignored"))
    assert torch.equal(again.test_labels, raw.test_labels)
    assert torch.equal(again.train_images, raw.train_images)
    bundle = build_data(DataConfig(name="digits", val_size=100, calib_size=64))
    assert (len(bundle.train), len(bundle.val), len(bundle.calib)) == (n_train - 100, 100, 64)
    assert bundle.info.image_size == 8 and bundle.info.in_channels == 1


# --------------------------------------------------------------------------- image folders


def _folder_bundle(root: Path, **overrides):
    cfg = dict(name="imagefolder", root=root, image_size=16, val_size=3, calib_size=4,
               num_workers=0)
    cfg.update(overrides)
    return build_data(DataConfig(**cfg))


def test_image_folder_bundle(tmp_path: Path) -> None:
    written = write_image_folder(tmp_path)
    bundle = _folder_bundle(tmp_path)
    assert bundle.info.class_names == ["cat", "dog", "eel"] and bundle.info.num_classes == 3
    assert bundle.info.in_channels == 3 and bundle.info.image_size == 16
    assert (len(bundle.train), len(bundle.val), len(bundle.test), len(bundle.calib)) == \
        (9, 3, 6, 4)
    batches = list(bundle.test.batches(4))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    labels = torch.cat([y for _, y in batches])
    assert labels.dtype == torch.int64
    assert labels.tolist() == [label for _, label in written["val"]]
    assert bundle.test.files == [path for path, _ in written["val"]]
    # train and val are held out of the same folder without overlap
    assert not set(bundle.train.files) & set(bundle.val.files)
    assert set(bundle.calib.files) <= set(bundle.train.files)


def test_image_folder_augmentation(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    train = _folder_bundle(tmp_path).train
    plain = torch.cat([x for x, _ in train.batches(5)])
    aug = torch.cat([x for x, _ in train.batches(5, augment=True, seed=1)])
    assert aug.shape == plain.shape and aug.dtype == plain.dtype
    assert not torch.equal(aug, plain)
    assert torch.equal(aug, torch.cat([x for x, _ in train.batches(5, augment=True, seed=1)]))
    assert not torch.equal(aug, torch.cat([x for x, _ in train.batches(5, augment=True,
                                                                       seed=2)]))
    # data.augment: false turns augmentation off even when the trainer asks for it
    off = _folder_bundle(tmp_path, augment=False).train
    assert torch.equal(torch.cat([x for x, _ in off.batches(5, augment=True, seed=1)]), plain)


def test_image_folder_workers_give_the_same_batches(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    inline = _folder_bundle(tmp_path, num_workers=0).train
    workers = _folder_bundle(tmp_path, num_workers=2).train
    for a, b in zip(inline.batches(4, shuffle=True, augment=True, seed=7),
                    workers.batches(4, shuffle=True, augment=True, seed=7), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_names_the_file(tmp_path: Path, workers: int) -> None:
    written = write_image_folder(tmp_path)
    bad = written["val"][1][0]
    assert bad.suffix == ".JPEG"
    bad.write_bytes(bad.read_bytes()[:40])  # header only, like an interrupted download
    test = _folder_bundle(tmp_path, num_workers=workers).test
    with pytest.raises(UserError) as exc:
        list(test.batches(4))
    message = str(exc.value)
    assert str(bad) in message and "\n" not in message


def test_image_folder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"root/train/<class>"):
        _folder_bundle(tmp_path)
    write_image_folder(tmp_path)
    (tmp_path / "val" / "eel").rename(tmp_path / "val" / "emu")
    with pytest.raises(UserError, match=r"missing: \['eel'\].*extra: \['emu'\]"):
        _folder_bundle(tmp_path)
    (tmp_path / "val" / "emu").rename(tmp_path / "val" / "eel")
    empty = tmp_path / "train" / "fox"
    empty.mkdir()
    (tmp_path / "val" / "fox").mkdir()
    with pytest.raises(UserError, match="no images"):
        _folder_bundle(tmp_path)


def test_transforms_geometry() -> None:
    img = Image.new("RGB", (40, 30))
    assert eval_transform(img, 16).size == (16, 16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert random_resized_crop(img, 12, gen).size == (12, 12)
    split = FileSplit([], torch.zeros(0, dtype=torch.int64), image_size=8, mean=(0.5,) * 3,
                      std=(0.5,) * 3)
    assert len(split) == 0 and list(split.batches(4)) == []


# --------------------------------------------------------------------------- ArraySplit


def test_array_split_augmentation() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8, generator=gen)
    labels = torch.arange(10)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = ArraySplit(images, labels, mean, std)
    x0, y0 = next(plain.batches(10))
    x_noop, _ = next(plain.batches(10, augment=True, seed=3))  # Augment(): nothing to do
    assert torch.equal(x_noop, x0)
    augmented = ArraySplit(images, labels, mean, std, augmentation=Augment(2, hflip=True))
    x1, y1 = next(augmented.batches(10, augment=True, seed=3))
    assert x1.shape == x0.shape and x1.dtype == x0.dtype and torch.equal(y1, y0)
    assert not torch.equal(x1, x0)
    x2, _ = next(augmented.batches(10, augment=True, seed=3))
    assert torch.equal(x1, x2)
    resized = ArraySplit(images, labels, mean, std, image_size=16)
    assert next(resized.batches(4))[0].shape == (4, 3, 16, 16)
