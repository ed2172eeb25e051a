"""``netshrink predict``: classify image files with a trained netshrink model file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from netshrink.data.imagefolder import open_image
from netshrink.errors import UserError
from netshrink.limits import check_regular
from netshrink.store.checkpoint import load_model


def load_image(path: Path, *, in_channels: int, size: int) -> torch.Tensor:
    """Decode ``path`` into a float tensor [C, size, size] in [0, 1].

    Only a regular image file of a format netshrink reads and at most
    ``MAX_IMAGE_PIXELS`` pixels is decoded (see ``netshrink.data.imagefolder.open_image``):
    a named pipe is refused rather than waited on, a decompression bomb before decoding.

    Fashion-MNIST's images are light clothes on black; a photo of clothes on a light
    background is the negative of that, so users should invert such photos themselves.

    Raises:
        UserError: missing, not a regular file, not a readable image, or too large.
    """
    with open_image(Path(path)) as opened:
        try:
            img = opened.convert("L" if in_channels == 1 else "RGB")
        except Exception as exc:  # Pillow reports damaged pixel data with many types
            raise UserError(f"{path}: not a readable image ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]}); replace the file") from None
    # Resize the shorter side, then center-crop a square, as evaluation does.
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                     Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    array = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def predict_files(
    weights: Path, images: list[Path], *, k: int = 5
) -> list[tuple[Path, list[tuple[str, float]]]]:
    """Top-``k`` (class name, probability) for each image.

    Raises:
        UserError: the model file lacks the preprocessing facts, or an image is unreadable.
    """
    for path in images:  # before the model loads: a bad path fails fast, a pipe never blocks
        check_regular(Path(path), "image")
    model, spec, meta = load_model(weights)
    needed = ("class_names", "image_size", "mean", "std")
    if not all(key in meta for key in needed):
        raise UserError(
            f"{weights}: not a netshrink model file with class names and preprocessing; "
            "use a model.safetensors written by `netshrink train` or `netshrink run`"
        )
    names: list[str] = meta["class_names"]
    mean = torch.tensor(meta["mean"]).view(-1, 1, 1)
    std = torch.tensor(meta["std"]).view(-1, 1, 1)
    batch = torch.stack([
        (load_image(p, in_channels=spec.in_channels, size=meta["image_size"]) - mean) / std
        for p in images
    ])
    with torch.inference_mode():
        probs = model(batch).softmax(dim=1)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        (path, [(names[int(i)], float(p)) for p, i in zip(vals, idx, strict=True)])
        for path, vals, idx in zip(images, top.values, top.indices, strict=True)
    ]
