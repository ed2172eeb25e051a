"""``netshrink predict``: classify image files with any model file netshrink writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from netshrink.data.bounds import batch_bytes, check_image_size, max_batch_bytes
from netshrink.data.images import decode, open_image, resize_crop
from netshrink.errors import UserError
from netshrink.limits import check_regular
from netshrink.runtime.files import OpenedModel, open_model_file


def load_image(path: Path, *, in_channels: int, size: int) -> torch.Tensor:
    """Decode ``path`` into a float tensor [C, size, size] in [0, 1].

    Only a regular image file of a format netshrink reads, within the pixel-count and
    aspect-ratio bounds of ``netshrink.data.bounds``, is decoded (see
    ``netshrink.data.images.open_image``): a named pipe is refused rather than
    waited on, a decompression bomb or a 3,000,000 x 1 strip before decoding. ``size``
    is bounded too (``NETSHRINK_MAX_IMAGE_SIZE``).

    Fashion-MNIST's images are light clothes on black; a photo of clothes on a light
    background is the negative of that, so users should invert such photos themselves.

    Raises:
        UserError: missing, not a regular file, not a readable image, too large or too
            long, or ``size`` beyond the bound.
    """
    check_image_size(size, "the model's image_size")
    mode = "L" if in_channels == 1 else "RGB"
    with open_image(Path(path)) as opened:
        img = decode(opened, mode, path)
        # Resize the shorter side, then center-crop a square, as evaluation does.
        w, h = img.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = resize_crop(img, (new_w, new_h), ((new_w - size) // 2, (new_h - size) // 2),
                          size)
    array = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def _dataset_facts(name: str, root: Path | None) -> dict[str, Any]:
    """Class names and preprocessing of the dataset ``name``, for a model file that does
    not carry them."""
    from netshrink.data import DataConfig, build_data, data_source

    source = data_source(name, root=root)
    info = build_data(DataConfig(**source, val_size=0, augment=False)).info
    return {"dataset": info.name, "class_names": list(info.class_names),
            "image_size": info.image_size, "in_channels": info.in_channels,
            "mean": list(info.mean), "std": list(info.std)}


def predict_files(
    weights: Path, images: list[Path], *, k: int = 5, data: str | None = None,
    data_dir: Path | None = None, runtime: str | None = None,
) -> list[tuple[Path, list[tuple[str, float]]]]:
    """Top-``k`` (class name, probability) for each image.

    ``weights`` is any model file netshrink writes (``.safetensors``, ``.onnx``, ``.nspk``,
    OpenVINO ``.xml``), told by content. Class names and preprocessing come from the
    file; for a file that lacks them (an ONNX model from elsewhere), from the dataset
    ``data`` (read from ``data_dir``, or its default place).

    Raises:
        UserError: the model file lacks the preprocessing facts and no ``data`` was
            given, or an image is unreadable.
    """
    for path in images:  # before the model loads: a bad path fails fast, a pipe never blocks
        check_regular(Path(path), "image")
    opened = open_model_file(weights, runtime=runtime)
    try:
        needed = ("class_names", "image_size", "mean", "std")
        meta = opened.meta
        if data is not None and data != meta.get("dataset"):
            meta = {**meta, **_dataset_facts(data, data_dir)}
        missing = [key for key in needed if key not in meta]
        if missing:
            raise UserError(
                f"{weights}: {opened.describe()} without netshrink's metadata, so its class "
                "names and preprocessing are unknown; pass --data NAME (and --data-dir) for "
                "the dataset it was trained on (netshrink list datasets)")
        names: list[str] = meta["class_names"]
        if opened.num_classes is not None and len(names) != opened.num_classes:
            raise UserError(f"{weights}: the model predicts {opened.num_classes} classes and "
                            f"{meta.get('dataset', 'the dataset')} has {len(names)}; pass the "
                            "dataset it was trained on")
        channels = meta.get("in_channels") or (opened.spec.in_channels if opened.spec else 3)
        size = meta["image_size"]
        check_image_size(size, "the model's image_size")
        # the images run a chunk at a time: that is the batch whose activations count
        opened.check_images(channels, size, batch=min(len(images), PREDICT_CHUNK),
                            data=meta.get("dataset") or "the file's metadata")
        mean = torch.tensor(meta["mean"]).view(-1, 1, 1)
        std = torch.tensor(meta["std"]).view(-1, 1, 1)
        for path in images:
            # Headers only: a format netshrink does not read or a shape beyond the bounds
            # is refused before any image is decoded (they are decoded a chunk at a time).
            with open_image(Path(path)):
                pass
        parts = []
        for chunk in _chunks(images, channels, size):
            batch = torch.stack([(load_image(p, in_channels=channels, size=size) - mean) / std
                                 for p in chunk])
            parts.append(_run(opened, batch))
        logits = torch.cat(parts)
    finally:
        opened.close()
    probs = logits.float().softmax(dim=1)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        (path, [(names[int(i)], float(p)) for p, i in zip(vals, idx, strict=True)])
        for path, vals, idx in zip(images, top.values, top.indices, strict=True)
    ]


# Images decoded and run together: enough to keep the model busy, few enough that a
# command line of thousands of photos never holds them all as floats at once.
PREDICT_CHUNK = 64


def _chunks(images: list[Path], channels: int, size: int) -> list[list[Path]]:
    """``images`` in groups whose float batch stays within ``NETSHRINK_MAX_BATCH_BYTES``."""
    per_image = batch_bytes(1, channels, size)
    n = max(1, min(PREDICT_CHUNK, max_batch_bytes() // per_image))
    return [images[i : i + n] for i in range(0, len(images), n)]


def _run(opened: OpenedModel, batch: torch.Tensor) -> torch.Tensor:
    """Logits of ``batch``, one image at a time when the graph's batch is fixed at 1."""
    model = opened.module
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    with torch.inference_mode():
        if opened.fixed_batch == 1:
            return torch.cat([model(x[None].to(opened.device, dtype)).cpu() for x in batch])
        return model(batch.to(opened.device, dtype)).cpu()
