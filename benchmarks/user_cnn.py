"""A user's own CNN and data for the benchmarks: not a ResNet, not netshrink's. A
MobileNetV2 in small for 28x28 grayscale images (inverted residuals: 1x1 expand, 3x3
depthwise, 1x1 project, the input added back where the shape allows), built by
``make_cnn`` — the factory a saved file names (``user_cnn:make_cnn`` with ``benchmarks/``
on the path) — and Fashion-MNIST as the user's own Datasets (``fashion_data``, a data
factory: ``--data user_cnn:fashion_data``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
MEAN, STD = 0.286, 0.353


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class UserCNN(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6()),
            InvertedResidual(w, w), InvertedResidual(w, w),
            InvertedResidual(w, 2 * w, stride=2),                     # 7x7
            InvertedResidual(2 * w, 2 * w), InvertedResidual(2 * w, 2 * w),
            InvertedResidual(2 * w, 4 * w, stride=2),                 # 4x4
            InvertedResidual(4 * w, 4 * w), InvertedResidual(4 * w, 4 * w),
            nn.Sequential(nn.Conv2d(4 * w, 8 * w, 1, bias=False), nn.BatchNorm2d(8 * w),
                          nn.ReLU6()))
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(8 * w, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def make_cnn(width: int = 16, classes: int = 10) -> UserCNN:
    return UserCNN(width, classes)


def fashion_data(root: str = str(FASHION), val: int = 5000) -> dict[str, Any]:
    """Fashion-MNIST as the user's Datasets: the last ``val`` training images held out
    for validation, the test set to report on; normalised as the model expects."""
    from netshrink.data.idx import read_fashion_mnist

    raw = read_fashion_mnist(Path(root))

    def dataset(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
        return TensorDataset((images.float() / 255 - MEAN) / STD, labels.long())

    full = dataset(raw.train_images, raw.train_labels)
    n = len(full)
    return {"train": Subset(full, range(n - val)), "val": Subset(full, range(n - val, n)),
            "test": dataset(raw.test_images, raw.test_labels),
            "class_names": list(raw.class_names)}
