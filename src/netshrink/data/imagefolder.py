"""ImageNet-style class folders, decoded lazily with Pillow.

Layout::

    root/train/<class>/*.jpg|png|...     training images, one folder per class
    root/val/<class>/*.jpg|png|...       the held-out set we report on (the ``test`` split)

Class names are the sorted folder names under ``train``; ``val`` must have the same ones.
The ``val`` split of the bundle is held out of ``train`` like for the in-memory datasets.

Transforms follow the usual ImageNet recipe (``netshrink.data.images``: the reading of one
image file and its crops), and training flips half the images. Every random draw comes
from a per-image seed that is fixed before decoding starts, so batches are the same for a
given seed whatever the number of worker processes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from netshrink.data.base import Batch, DataBundle, DatasetInfo, shard_rows
from netshrink.data.bounds import (
    check_batch,
    max_classes,
    max_image_files,
    raise_hint,
)
from netshrink.data.images import (
    IMAGE_EXTENSIONS,
    check_image_files,
    decode,
    eval_transform,
    open_image,
    random_resized_crop,
    to_tensor,
)
from netshrink.errors import UserError

if TYPE_CHECKING:
    from netshrink.data import DataConfig, DatasetSpec

_LAYOUT = (
    "expected root/train/<class>/<images> and root/val/<class>/<images> "
    "(jpg, png, ...; one folder per class, the same class folders in both)"
)

@dataclass(frozen=True)
class _Failure:
    """A file that could not be decoded, passed back from a worker as data.

    Raising in a DataLoader worker re-raises in the main process with the worker's whole
    traceback folded into the message; the CLI wants one line naming the file.
    """

    message: str


class _ImageDataset(Dataset):
    """Decodes ``files[i]`` and applies the eval or the seeded training transform.

    Keys are ``(index, seed)``: ``seed < 0`` means the eval transform, otherwise the seed
    of this image's augmentation draws.
    """

    def __init__(
        self, files: Sequence[Path], labels: Tensor, image_size: int, mode: str,
        mean: tuple[float, ...], std: tuple[float, ...],
    ) -> None:
        self.files = files
        self.labels = labels
        self.image_size = image_size
        self.mode = mode
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int] | _Failure:
        index, seed = key
        try:
            with open_image(self.files[index]) as opened:
                # Transformed while the decoded image is open: no copy of a large image.
                img = decode(opened, self.mode, self.files[index])
                return self._transform(img, seed), int(self.labels[index])
        except UserError as exc:
            return _Failure(str(exc))

    def _transform(self, img: Image.Image, seed: int) -> Tensor:
        if seed < 0:
            img = eval_transform(img, self.image_size)
        else:
            gen = torch.Generator().manual_seed(seed)
            img = random_resized_crop(img, self.image_size, gen)
            if float(torch.rand((), generator=gen)) < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img, self.mean, self.std)


def _collate(items: list[tuple[Tensor, int] | _Failure]) -> Batch | _Failure:
    for item in items:
        if isinstance(item, _Failure):
            return item
    images = torch.stack([item[0] for item in items])  # type: ignore[index]
    labels = torch.tensor([item[1] for item in items], dtype=torch.int64)  # type: ignore[index]
    return images, labels


class FileSplit:
    """A split of image files decoded on the fly; satisfies ``Split``.

    Args:
        files: image paths.
        labels: int64 class index per file.
        image_size: side of the square images the model sees.
        mean / std: per-channel normalisation.
        mode: Pillow mode, ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
        num_workers: decoding processes (0: decode in this process).
        augmentation: whether ``batches(augment=True)`` augments at all (the recipe's
            ``data.augment``); evaluation never augments.
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: Tensor,
        *,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        mode: str = "RGB",
        num_workers: int = 0,
        augmentation: bool = True,
    ) -> None:
        if labels.shape != (len(files),):
            raise ValueError("FileSplit.labels must have one label per file")
        self.files = list(files)
        self.labels = labels.to(torch.int64)
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.mode = mode
        self.num_workers = num_workers
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: Tensor | Sequence[int]) -> FileSplit:
        """The files at ``indices``, in that order, with the same settings."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return FileSplit(
            [self.files[i] for i in idx.tolist()], self.labels[idx],
            image_size=self.image_size, mean=self.mean, std=self.std, mode=self.mode,
            num_workers=self.num_workers, augmentation=self.augmentation,
        )

    def _keys(self, *, shuffle: bool, augment: bool, seed: int) -> list[tuple[int, int]]:
        """``(index, seed)`` of every image in the order batches take them."""
        gen = torch.Generator().manual_seed(seed)
        n = len(self)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        if augment and self.augmentation:
            # Draw every image's seed up front so the result does not depend on which
            # worker decodes which image.
            seeds = torch.randint(0, 2**62, (n,), generator=gen).tolist()
        else:
            seeds = [-1] * n
        return list(zip(order.tolist(), seeds, strict=True))

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a batch size whose float batches would pass ``NETSHRINK_MAX_BATCH_BYTES``
        (the last wall: recipes and commands check their own batch sizes first).

        Raises:
            UserError: naming the batch size and the fix.
        """
        check_batch("batch_size", batch_size, largest=len(self),
                    channels=3 if self.mode == "RGB" else 1, size=self.image_size)

    def _loader(self, seed: int, **batching: Any) -> Iterator[Batch]:
        dataset = _ImageDataset(self.files, self.labels, self.image_size, self.mode,
                                self.mean, self.std)
        loader = DataLoader(
            dataset,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            collate_fn=_collate,
            # Our own generator: otherwise worker start-up would draw from the global RNG
            # and shift the model's initialisation or dropout between runs.
            generator=torch.Generator().manual_seed(seed),
            **batching,
        )
        for batch in loader:
            if isinstance(batch, _Failure):
                raise UserError(batch.message)
            yield batch

    def batches(
        self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0
    ) -> Iterator[Batch]:
        """Yield ``(images [B, C, S, S] float, labels [B] int64)``.

        Raises:
            UserError: an image cannot be decoded (the message names the file).
        """
        self.check_batch_size(batch_size)
        keys = self._keys(shuffle=shuffle, augment=augment, seed=seed)
        yield from self._loader(seed, batch_size=batch_size, sampler=keys)

    def shard_batches(
        self, batch_size: int, *, rank: int, size: int, shuffle: bool = False,
        augment: bool = False, seed: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor, int]]:
        """Rank ``rank`` of ``size``'s share of each batch ``batches`` yields (the same
        images, transformed with the same seeds), with the whole batch's size: each rank
        of a data-parallel training decodes only its own share.

        Raises:
            UserError: an image cannot be decoded (the message names the file).
        """
        self.check_batch_size(-(-batch_size // size))  # this rank's share
        keys = self._keys(shuffle=shuffle, augment=augment, seed=seed)
        groups = [keys[start : start + batch_size] for start in range(0, len(keys), batch_size)]
        shares = [group[shard_rows(len(group), rank, size)] for group in groups]
        loaded = self._loader(seed, batch_sampler=[share for share in shares if share])
        channels = 3 if self.mode == "RGB" else 1
        for group, share in zip(groups, shares, strict=True):
            if share:
                x, y = next(loaded)
            else:  # a last batch smaller than the ranks: this rank has no image of it
                side = self.image_size
                x, y = torch.zeros(0, channels, side, side), torch.zeros(0, dtype=torch.int64)
            yield x, y, len(group)


# --------------------------------------------------------------------------- the folders


def _inside(path: Path, root: str) -> str:
    """``path`` resolved, which must lie in ``root`` (resolved); links are followed once.

    Raises:
        UserError: a broken link, or one that leads out of the dataset folder.
    """
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise UserError(f"{path}: a broken symbolic link; remove it or restore its target")
    if os.path.commonpath([root, real]) != root:
        raise UserError(
            f"{path}: leads to {real}, outside the dataset folder {root}; netshrink does not "
            "follow links out of it: copy the files in, or pass the folder that holds "
            "them all as --data-dir"
        )
    return real


def _scan(folder: Path, limit: int, what: str, hint: str) -> list[os.DirEntry]:
    """The visible entries of ``folder``, sorted by name; at most ``limit`` of them.

    Counted while listing, so a folder of millions of entries is refused after ``limit``
    rather than held in memory whole.

    Raises:
        UserError: the folder cannot be listed, or holds more than ``limit`` entries
            (``what`` names them in the message, ``hint`` says how to raise the bound).
    """
    entries: list[os.DirEntry] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if len(entries) >= limit:
                    raise UserError(f"{folder}: more than {limit:,} {what}; this is not a "
                                    f"dataset netshrink reads: {hint}")
                entries.append(entry)
    except OSError as exc:
        raise UserError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
    return sorted(entries, key=lambda e: e.name)


def _class_folders(folder: Path, root: str) -> list[str]:
    names = []
    for entry in _scan(folder, max_classes(), "class folders",
                       raise_hint("NETSHRINK_MAX_CLASSES")):
        if entry.is_symlink():
            if os.path.isdir(_inside(Path(entry.path), root)):
                names.append(entry.name)
        elif entry.is_dir(follow_symlinks=False):
            names.append(entry.name)
    return names


def _image_files(folder: Path, root: str) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, hidden files skipped.

    The walk never leaves ``root`` (a symbolic link is followed only to a place inside
    it), never visits a folder twice (a link back up the tree is an error, not a loop),
    and takes only regular files: a named pipe or device with an image's name is an
    error, since decoding it would block or read forever. Types come from the directory
    listing (no stat per file), which matters for ImageNet's 1.28 million images on a
    network disk. Hidden files are skipped because macOS leaves ``._name.jpg`` resource
    forks that are not images. The order is ``os.walk``'s: a folder's files, then its
    subfolders, each sorted.
    """
    limit, hint = max_image_files(), raise_hint("NETSHRINK_MAX_IMAGE_FILES")
    found: list[Path] = []
    visited: set[str] = set()
    stack = [(folder, _inside(folder, root))]
    while stack:
        here, real = stack.pop()
        if real in visited:
            continue  # a second link to a folder already read: its images count once
        visited.add(real)
        subfolders = []
        for entry in _scan(here, limit, "entries", hint):
            path = Path(entry.path)
            is_image = Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
            if entry.is_symlink():
                target = _inside(path, root)
                mode = os.stat(target).st_mode
                if stat.S_ISDIR(mode):
                    if os.path.commonpath([target, real]) == target:
                        raise UserError(f"{path}: a symbolic link back to {target}, which "
                                        "contains it (a loop); remove the link")
                    subfolders.append((path, target))
                elif is_image and stat.S_ISREG(mode):
                    found.append(path)
                elif is_image:
                    raise UserError(f"{path}: not a regular file (a link to a pipe, device "
                                    "or socket); remove it from the dataset")
            elif entry.is_dir(follow_symlinks=False):
                subfolders.append((path, os.path.join(real, entry.name)))
            elif is_image:
                if not entry.is_file(follow_symlinks=False):
                    raise UserError(f"{path}: not a regular file (a named pipe, device or "
                                    "socket); remove it from the dataset")
                found.append(path)
        if len(found) + len(visited) > limit:
            raise UserError(f"{folder}: more than {limit:,} image files and folders; this "
                            f"is not a dataset netshrink reads: {hint}")
        stack.extend(reversed(subfolders))
    return found


def scan_image_folder(
    folder: Path, classes: list[str] | None = None, *, root: Path | None = None
) -> tuple[list[Path], Tensor, list[str]]:
    """List the images of one split folder.

    Args:
        folder: ``root/train`` or ``root/val``.
        classes: the class names it must have (those of ``train``); None to take its own.
        root: the dataset folder no symbolic link may lead out of (default: ``folder``'s
            parent).

    Returns:
        The files, their int64 labels and the class names.

    Raises:
        UserError: the folder is missing, has no class folders, different class folders
            from ``classes``, (for train) a class without images, a link out of ``root``
            or back up the tree, or an image name that is not a regular file.
    """
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found; {_LAYOUT}")
    real_root = os.path.realpath(folder.parent if root is None else root)
    _inside(folder, real_root)
    found = _class_folders(folder, real_root)
    if not found:
        raise UserError(f"{folder}: no class folders; {_LAYOUT}")
    if classes is not None and found != classes:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise UserError(
            f"{folder}: class folders differ from train's (missing: {missing[:5]}, "
            f"extra: {extra[:5]}); {_LAYOUT}"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(found):
        images = _image_files(folder / name, real_root)
        if not images and classes is None:
            raise UserError(f"{folder / name}: class folder has no images; {_LAYOUT}")
        files.extend(images)
        labels.extend([label] * len(images))
        if len(files) > max_image_files():
            raise UserError(f"{folder}: more than {max_image_files():,} image files; "
                            f"this is not a dataset netshrink reads: "
                            f"{raise_hint('NETSHRINK_MAX_IMAGE_FILES')}")
    if not files:
        raise UserError(f"{folder}: no images found; {_LAYOUT}")
    return files, torch.tensor(labels, dtype=torch.int64), found


def _limit(n: int, limit: int | None, seed: int) -> Tensor:
    """Indices of ``limit`` images out of ``n``: a seeded sample, kept in file order.

    The files are sorted by class, so "the first N" (what in-memory datasets do) would
    give a quick run only the first few classes.
    """
    if limit is None or limit >= n:
        return torch.arange(n)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    return chosen.sort().values


def build_image_folder(cfg: DataConfig, root: Path | None, spec: DatasetSpec) -> DataBundle:
    """Cut an image-folder dataset into a ``DataBundle``.

    Args:
        cfg: the recipe's data section (sizes, limits, seed, workers, augmentation).
        root: the folder holding ``train/`` and ``val/``.
        spec: the registered dataset's normalisation, channels and default image size.

    Returns:
        ``train`` and ``val`` (held out of ``root/train``), ``test`` (``root/val``) and
        ``calib`` (a subset of ``train``), all decoding lazily.

    Raises:
        UserError: no root given, missing folders, mismatched classes, no images, or
            ``val_size`` too large.
    """
    from netshrink.data import check_eval_batch, split_indices

    if root is None:
        raise UserError(f"the imagefolder dataset needs a folder: pass --data-dir; {_LAYOUT}")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found; {_LAYOUT}")
    train_files, train_labels, classes = scan_image_folder(root / "train", root=root)
    test_files, test_labels, _ = scan_image_folder(root / "val", classes, root=root)
    image_size = cfg.image_size or spec.image_size
    mode = "L" if spec.in_channels == 1 else "RGB"

    def split(files: list[Path], labels: Tensor, limit: int | None) -> FileSplit:
        keep = _limit(len(files), limit, cfg.seed).tolist()
        return FileSplit(
            [files[i] for i in keep], labels[keep], image_size=image_size, mean=spec.mean,
            std=spec.std, mode=mode, num_workers=cfg.num_workers, augmentation=cfg.augment,
        )

    full = split(train_files, train_labels, cfg.train_limit)
    train_idx, val_idx, calib_idx = split_indices(len(full), cfg.val_size, cfg.calib_size,
                                                   cfg.seed)
    info = DatasetInfo(
        name=cfg.name,
        num_classes=len(classes),
        in_channels=1 if mode == "L" else 3,
        image_size=image_size,
        class_names=classes,
        mean=spec.mean,
        std=spec.std,
    )
    test = split(test_files, test_labels, cfg.test_limit)
    check_eval_batch(cfg, info, max(len(full), len(test)))
    return DataBundle(
        info=info,
        train=full.subset(train_idx),
        val=full.subset(val_idx) if len(val_idx) else None,
        test=test,
        calib=full.subset(calib_idx),
    )


def check_image_folder(root: Path) -> int:
    """Check every image of an image-folder dataset before anything is trained or written.

    Scans ``root/train`` and ``root/val`` as ``build_image_folder`` does (same layout and
    link rules) and checks each image with ``check_image``: a regular file, a format
    netshrink decodes, a width and height within the pixel and aspect bounds of
    ``netshrink.data.bounds``, and a structure Pillow's ``verify`` accepts. It reads
    headers and (for PNG) checksums, not pixels: a file damaged inside its compressed
    pixel data can still fail when it is decoded.

    Args:
        root: the folder holding ``train/`` and ``val/``.

    Returns:
        The number of images checked.

    Raises:
        UserError: the layout is wrong or an image is bad; the message names the file.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found; {_LAYOUT}")
    train, _, classes = scan_image_folder(root / "train", root=root)
    val, _, _ = scan_image_folder(root / "val", classes, root=root)
    return check_image_files([*train, *val])
