"""What a data file or a data setting may make netshrink allocate, checked before it does.

Each bound is generous for real datasets and photos, stated in the refusal, and can be
raised with an environment variable of the same name (``NETSHRINK_MAX_IMAGE_PIXELS=...``)
for the rare real input beyond it. The values are read when they are checked, so a
variable set for one command (or inherited by a DataLoader worker) applies to it.

* ``NETSHRINK_MAX_IMAGE_PIXELS`` (default 2**27, about 134 million): pixels of one image
  file. A 108-megapixel phone photo (12,000 x 9,000) and a 16,384 x 8,192 panorama pass;
  decoding one that large takes about 400 MB as RGB. Pillow refuses more than twice its
  own ``Image.MAX_IMAGE_PIXELS`` (179 million pixels) whatever this says.
* ``NETSHRINK_MAX_IMAGE_ASPECT`` (default 50): the longer side over the shorter. Resizing
  the shorter side to the model's input scales the longer one with it, so a 3,000,000 x 1
  strip that passes any pixel bound would become gigabytes; a stitched 360-degree phone
  panorama is about 8:1, a long scan strip rarely past 20:1.
* ``NETSHRINK_MAX_IMAGE_SIZE`` (default 2048): ``data.image_size``, the side of the square
  the model sees. Classification CNNs are trained at 224 to 600 pixels (the largest
  published ImageNet resolutions are about 800); 2048 leaves room for high-resolution
  medical or satellite crops. One RGB image at 2048 is already 50 MB as floats.
* ``NETSHRINK_MAX_BATCH_BYTES`` (default 2 GiB): one batch of float images, images x
  channels x side x side x 4 bytes, as one process loads it. ImageNet's batch of 256 at
  224 px is 154 MB, a large-batch 2,048 at 224 px 1.2 GB; at 1024 px a batch of 170
  passes (the activations of such a batch are many times that anyway).
* ``NETSHRINK_MAX_IDX_BYTES`` (default 256 MiB): the data one IDX file declares.
  Fashion-MNIST's largest file holds 47 MB, EMNIST-digits' 188 MB.
* ``NETSHRINK_MAX_CLASSES`` (default 100,000): class folders of an image-folder dataset
  (ImageNet-21k has 21,841); each becomes a row of the model's last layer.
* ``NETSHRINK_MAX_IMAGE_FILES`` (default 20 million): image files in one split folder
  (ImageNet-21k holds 14 million); each costs a few hundred bytes of memory to list.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from netshrink.errors import UserError
from netshrink.limits import env_bound

__all__ = [
    "batch_bytes",
    "batch_sizes",
    "check_batch",
    "check_config_batches",
    "check_image_shape",
    "check_image_size",
    "max_batch_bytes",
    "max_classes",
    "max_idx_bytes",
    "max_image_aspect",
    "max_image_files",
    "max_image_pixels",
    "max_image_size",
    "raise_hint",
]

_DEFAULTS = {
    "NETSHRINK_MAX_IMAGE_PIXELS": 1 << 27,
    "NETSHRINK_MAX_IMAGE_ASPECT": 50,
    "NETSHRINK_MAX_IMAGE_SIZE": 2048,
    "NETSHRINK_MAX_BATCH_BYTES": 2 << 30,
    "NETSHRINK_MAX_IDX_BYTES": 256 << 20,
    "NETSHRINK_MAX_CLASSES": 100_000,
    "NETSHRINK_MAX_IMAGE_FILES": 20_000_000,
}
_FLOAT = 4  # bytes of one float32 value: what every batch of images becomes


def _bound(name: str) -> int:
    """The bound ``name``: its environment variable if set, else the default.

    Raises:
        UserError: the variable is set to something other than a whole number >= 1.
    """
    return env_bound(name, _DEFAULTS[name])


def raise_hint(name: str) -> str:
    """How a refusal says to raise the bound ``name``."""
    return f"set the environment variable {name} to raise this bound"


def max_image_pixels() -> int:
    return _bound("NETSHRINK_MAX_IMAGE_PIXELS")


def max_image_aspect() -> int:
    return _bound("NETSHRINK_MAX_IMAGE_ASPECT")


def max_image_size() -> int:
    return _bound("NETSHRINK_MAX_IMAGE_SIZE")


def max_batch_bytes() -> int:
    return _bound("NETSHRINK_MAX_BATCH_BYTES")


def max_idx_bytes() -> int:
    return _bound("NETSHRINK_MAX_IDX_BYTES")


def max_classes() -> int:
    return _bound("NETSHRINK_MAX_CLASSES")


def max_image_files() -> int:
    return _bound("NETSHRINK_MAX_IMAGE_FILES")


def check_image_shape(width: int, height: int) -> str | None:
    """Why an image of ``width`` x ``height`` pixels (from its header) may not be
    decoded, or None when it may: empty, more pixels or a longer aspect than the bounds.

    Only the header's numbers are used: nothing has been decoded yet.
    """
    if width < 1 or height < 1:
        return f"image of {width} x {height} pixels, which holds no pixels; replace the file"
    pixels, limit = width * height, max_image_pixels()
    if pixels > limit:
        return (f"image of {width:,} x {height:,} pixels ({pixels:,}); netshrink decodes at "
                f"most {limit:,}: resize or remove the file, or "
                f"{raise_hint('NETSHRINK_MAX_IMAGE_PIXELS')}")
    aspect, ratio = max(width, height) / min(width, height), max_image_aspect()
    if aspect > ratio:
        shown = f"{aspect:,.0f}" if aspect >= 1000 else f"{aspect:.3g}"
        return (f"image of {width:,} x {height:,} pixels, {shown}:1; netshrink decodes "
                f"images up to {ratio}:1 (resizing its shorter side to the model's input "
                f"would scale the longer one with it): crop or remove the file, or "
                f"{raise_hint('NETSHRINK_MAX_IMAGE_ASPECT')}")
    return None


def check_image_size(size: int, what: str = "data.image_size") -> int:
    """``size``, the side of the square images a model sees, if within the bound.

    Raises:
        UserError: above ``NETSHRINK_MAX_IMAGE_SIZE``. (Raised from a pydantic validator,
            a ``UserError`` passes through pydantic as it is, so a recipe, the model file
            ``eval`` reads and the Python API all report the bound the same way.)
    """
    limit = max_image_size()
    if size > limit:
        raise UserError(f"{what} {size:,} is more than the {limit:,} pixels a side netshrink "
                         f"takes (one RGB image of {size:,} x {size:,} is "
                         f"{3 * size * size * _FLOAT / 1e6:,.0f} MB as floats); lower it, or "
                         f"{raise_hint('NETSHRINK_MAX_IMAGE_SIZE')}")
    return size


def batch_bytes(images: int, channels: int, size: int) -> int:
    """Bytes of one float batch of ``images`` images of ``channels`` x ``size`` x ``size``."""
    return images * channels * size * size * _FLOAT


def check_batch(setting: str, batch_size: int, *, largest: int, channels: int,
                size: int) -> None:
    """Refuse a batch size whose batches of float images would pass
    ``NETSHRINK_MAX_BATCH_BYTES``.

    Args:
        setting: where the batch size was set, for the message (``data.batch_size``).
        batch_size: its value.
        largest: images in the largest split it cuts (a batch holds at most that many).
        channels / size: of each image.

    Raises:
        UserError: the batch would be larger than the bound.
    """
    images = min(batch_size, largest)
    need, limit = batch_bytes(images, channels, size), max_batch_bytes()
    if need > limit:
        shown = f"{batch_size:,}" if images == batch_size else \
            f"{batch_size:,} (batches of {images:,} images here)"
        raise UserError(f"{setting} {shown} at {channels} x {size} x {size} needs "
                        f"{need / 1e9:,.1f} GB a batch, more than the {limit / 1e9:,.1f} GB "
                        f"({limit:,} bytes) netshrink allows one batch: lower the batch "
                        "size or the image size, or "
                        f"{raise_hint('NETSHRINK_MAX_BATCH_BYTES')}")


def batch_sizes(config: Any, where: str = "") -> list[tuple[str, int]]:
    """Every ``*batch_size`` setting in a (pydantic) stage config, with its place, so a
    run can check the batches its stages will load before it writes anything."""
    if isinstance(config, BaseModel):
        found = []
        for name in type(config).model_fields:
            value = getattr(config, name)
            place = f"{where}.{name}" if where else name
            if name.endswith("batch_size") and isinstance(value, int) \
                    and not isinstance(value, bool):
                found.append((place, value))
            else:
                found.extend(batch_sizes(value, place))
        return found
    if isinstance(config, list | tuple):
        return [found for i, item in enumerate(config)
                for found in batch_sizes(item, f"{where}[{i}]")]
    return []


def check_config_batches(config: Any, where: str, *, channels: int, size: int,
                         largest: int) -> None:
    """``check_batch`` for every ``*batch_size`` of ``config`` (``batch_sizes``), where a
    batch is at most ``largest`` images (the largest split it can be cut from).

    Raises:
        UserError: naming ``where`` and the setting.
    """
    for place, batch in batch_sizes(config):
        check_batch(f"{where}: {place}", batch, largest=largest, channels=channels,
                    size=size)
