"""One image file: opened with its shape bounded from the header, decoded, transformed.

Pillow reads only the header on ``open``; ``open_image`` refuses an image whose pixel
count or aspect ratio passes netshrink's bounds (``netshrink.data.bounds``) before a pixel
is decoded, and turns Pillow's many exception types for a damaged file into one line.
The transforms follow the usual ImageNet recipe (the same arithmetic as torchvision's,
which does not import here): evaluation resizes the shorter side to ``round(S * 256 /
224)`` and centre-crops ``S``; training takes a random-resized crop (scale 0.08..1,
aspect 3/4..4/3).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from netshrink.data.bounds import check_image_shape, max_image_pixels
from netshrink.errors import UserError
from netshrink.limits import clip, open_regular

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
# The decoders an image file may use: those of IMAGE_EXTENSIONS (MPO is how Pillow names
# many cameras' JPEGs). Pillow picks a decoder by content, not by name, and some of its
# others are large attack surfaces or call out to programs (EPS runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")


def _formats() -> list[str]:
    """Those of ``IMAGE_FORMATS`` this Pillow has (it registers MPO and WebP lazily)."""
    Image.preinit()
    if any(f not in Image.OPEN for f in IMAGE_FORMATS):
        for plugin in ("MpoImagePlugin", "WebPImagePlugin", "TiffImagePlugin"):
            with suppress(ImportError):  # a Pillow built without it
                __import__(f"PIL.{plugin}")
    return [f for f in IMAGE_FORMATS if f in Image.OPEN]


def _brief(exc: BaseException) -> str:
    return clip(str(exc))


@contextmanager
def _quiet() -> Iterator[None]:
    """Pillow's warnings silenced: they would be lines on stderr beside the one a bad
    file gets (or noise where the file decodes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """Open an image file lazily (header read, pixels not yet decoded), within bounds.

    Only a regular file is opened (a named pipe would block), only with the decoders of
    ``IMAGE_FORMATS``, and only if its header's width and height pass
    ``netshrink.data.bounds.check_image_shape`` (pixel count and aspect ratio), so nothing
    a crafted header claims is ever decoded or resized. Pillow's decompression-bomb
    warning is left to that check (its threshold is below ours); Pillow's own refusal,
    at twice its threshold, becomes the same one-line error.

    Raises:
        UserError: missing, not a regular file, not an image of those formats, too large
            or too long, or a header Pillow cannot read; the message names the file and
            the fix.
    """
    with open_regular(path, "image") as f:
        try:
            with _quiet():
                img = Image.open(f, formats=_formats())
        except Image.DecompressionBombError as exc:
            # Pillow's own refusal (past twice PIL.Image.MAX_IMAGE_PIXELS), above our
            # default bound: raising NETSHRINK_MAX_IMAGE_PIXELS cannot pass it.
            raise UserError(f"{path}: image too large to decode safely ({_brief(exc)}); "
                            f"netshrink decodes at most {max_image_pixels():,} pixels and "
                            "Pillow refuses this one whatever that bound says: resize or "
                            "remove the file") from None
        except UnidentifiedImageError:
            raise UserError(f"{path}: not an image netshrink reads (formats: "
                            f"{', '.join(IMAGE_FORMATS)}); delete or replace the "
                            "file") from None
        except MemoryError:
            raise  # the machine's fault, not the file's: no "delete the file"
        except Exception as exc:  # Pillow reports bad files with many exception types
            raise UserError(f"{path}: cannot decode image ({type(exc).__name__}: "
                            f"{_brief(exc)}); delete or replace the file (formats read: "
                            f"{', '.join(IMAGE_FORMATS)})") from None
        with img:
            why = check_image_shape(*img.size)
            if why is not None:
                raise UserError(f"{path}: {why}")
            yield img


def decode(opened: Image.Image, mode: str, path: Path) -> Image.Image:
    """The pixels of ``opened`` (from ``open_image``) in ``mode`` (``"RGB"`` or ``"L"``).

    An image already in ``mode`` is decoded in place rather than converted, since
    ``convert`` to the same mode copies it: half the memory for a large photo. Use the
    result inside ``open_image``'s block.

    Raises:
        UserError: the pixel data is damaged (Pillow reports that with many exception
            types: OSError, SyntaxError, ValueError, ...).
    """
    try:
        with _quiet():
            img = opened if opened.mode == mode else opened.convert(mode)
            img.load()
    except MemoryError:
        raise  # the machine's fault, not the file's: no "delete the file"
    except Exception as exc:
        raise UserError(f"{path}: cannot decode image ({type(exc).__name__}: {_brief(exc)}); "
                        "delete or replace the file") from None
    return img


def check_image(path: Path) -> None:
    """Check an image file without decoding its pixels: header, size, and Pillow's
    ``verify`` (chunk checksums for PNG, structure for the others).

    Raises:
        UserError: see ``open_image``; also a file ``verify`` finds damaged.
    """
    with open_image(path) as img:
        try:
            with _quiet():
                img.verify()
        except MemoryError:
            raise  # the machine's fault, not the file's
        except Exception as exc:
            raise UserError(f"{path}: damaged image ({type(exc).__name__}: {_brief(exc)}); "
                            "delete or replace the file") from None


def check_image_files(files: Iterable[Path]) -> int:
    """``check_image`` every file; the number checked.

    Raises:
        UserError: the first bad file, named.
    """
    count = 0
    for path in files:
        check_image(path)
        count += 1
    return count


# --------------------------------------------------------------------------- transforms


def eval_transform(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``round(size * 256 / 224)``, then centre-crop ``size``."""
    w, h = img.size
    short = round(size * 256 / 224)
    if w <= h:
        new_w, new_h = short, max(1, int(short * h / w))
    else:
        new_w, new_h = max(1, int(short * w / h)), short
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    return resize_crop(img, (new_w, new_h), (left, top), size)


# Above this many pixels, the resized image is never made whole (see ``resize_crop``).
_WHOLE_RESIZE_PIXELS = 1 << 22


def resize_crop(img: Image.Image, resized: tuple[int, int], corner: tuple[int, int],
                size: int) -> Image.Image:
    """The ``size`` x ``size`` square at ``corner`` (left, top) of ``img`` resized to
    ``resized`` (bilinear).

    An image within the aspect bound can still resize to a long strip (50:1 at the
    largest image size is hundreds of MB), so when the resized image would be large only
    the crop's box is resized: Pillow places each output pixel's filter at the same
    source position either way, so the two agree to a level or two of rounding. Ordinary
    images keep the whole resize, bit for bit what they always gave.
    """
    w, h = img.size
    new_w, new_h = resized
    left, top = corner
    if new_w * new_h <= max(_WHOLE_RESIZE_PIXELS, 4 * size * size):
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        return img.crop((left, top, left + size, top + size))
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def random_resized_crop(
    img: Image.Image,
    size: int,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """Crop a random area fraction ``scale`` with aspect ``ratio`` and resize it to ``size``.

    Ten tries at a box that fits, then the whole image clamped to ``ratio`` (torchvision's
    algorithm), with every draw from ``gen``.
    """
    w, h = img.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    for _ in range(10):
        target_area = area * uniform(*scale)
        aspect = math.exp(uniform(*log_ratio))
        cw = round(math.sqrt(target_area * aspect))
        ch = round(math.sqrt(target_area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            break
    else:
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif in_ratio > ratio[1]:
            cw, ch = round(h * ratio[1]), h
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))


def to_tensor(img: Image.Image, mean: Tensor, std: Tensor) -> Tensor:
    """PIL image -> normalised float ``[C, H, W]``."""
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:  # mode "L"
        array = array[:, :, None]
    x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(mean).div_(std)


# --------------------------------------------------------------------------- decoding
