"""``netshrink predict``: classify image files with a trained netshrink model file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from netshrink.errors import UserError
from netshrink.store.checkpoint import load_model


def load_image(path: Path, *, in_channels: int, size: int) -> torch.Tensor:
    """Decode ``path`` into a float tensor [C, size, size] in [0, 1].

    Fashion-MNIST's images are light clothes on black; a photo of clothes on a light
    background is the negative of that, so users should invert such photos themselves.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("L" if in_channels == 1 else "RGB")
            # Resize the shorter side, then center-crop a square, as evaluation does.
            w, h = img.size
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                             Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from None
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def predict_files(
    weights: Path, images: list[Path], *, k: int = 5
) -> list[tuple[Path, list[tuple[str, float]]]]:
    """Top-``k`` (class name, probability) for each image.

    Raises:
        UserError: the model file lacks the preprocessing facts, or an image is unreadable.
    """
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
