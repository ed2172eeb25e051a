"""ResNet-18/34/50/101 with torchvision's parameter names and shapes.

torchvision itself does not import next to the torch we pin, so the network is written
here. Every parameter and buffer keeps torchvision's name and shape, so a torchvision
checkpoint (a plain dict of tensors such as ``resnet18-f37072fd.pth``) loads with
``strict=True`` and gives the same outputs. The bottleneck strides in its 3x3 conv
("ResNet v1.5"), as torchvision does.

Two stems:
  * ``imagenet``: 7x7 stride-2 conv + 3x3 stride-2 max-pool (torchvision's).
  * ``cifar``: 3x3 stride-1 conv, no max-pool (for 32x32 inputs). Parameter names stay the
    same; only ``conv1``'s kernel shape differs and ``maxpool`` is an identity.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from netshrink.errors import UserError

Stem = Literal["imagenet", "cifar"]


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that, in training, computes a conv with a 1x1 output as the matmul it is.

    Small inputs (Fashion-MNIST's 28x28 through the ImageNet stem) reach layer4 as 1x1
    maps. A 3x3/pad-1 conv there only ever multiplies its centre tap, but oneDNN's
    backward pass still runs the whole 3x3 kernel over padding, about 30x the forward's
    time; the matmul over the taps that touch real pixels gives the same outputs and
    gradients (the other taps' gradients are exactly zero either way) and trains a
    ResNet-18 at 28x28 1.8x faster on 2 cores. Evaluation and export keep the plain conv,
    so latency and MAC figures are those of the standard network.
    """

    def forward(self, x: Tensor) -> Tensor:
        return conv_forward(self, x, self.weight)


def conv_forward(conv: nn.Conv2d, x: Tensor, weight: Tensor) -> Tensor:
    """``conv``'s forward with ``weight`` (e.g. fake-quantized), 1-pixel outputs as matmuls
    in training (see ``Conv2d``)."""
    plain = conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
    if conv.training and plain and isinstance(conv.padding, tuple):
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        h, w = x.shape[-2:]
        if (h + 2 * ph - kh) // sh == 0 and (w + 2 * pw - kw) // sw == 0:
            # The single output pixel sees input rows [0, rows) through taps [ph, ph+rows).
            rows, cols = min(h, kh - ph), min(w, kw - pw)
            taps = weight[:, :, ph : ph + rows, pw : pw + cols].flatten(1)
            out = F.linear(x[:, :, :rows, :cols].flatten(1), taps, conv.bias)
            return out.view(x.shape[0], -1, 1, 1)
    return conv._conv_forward(x, weight, conv.bias)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-compatible ResNet.

    Args:
        block: ``BasicBlock`` (18/34) or ``Bottleneck`` (50/101).
        layers: blocks per stage, e.g. ``[2, 2, 2, 2]``.
        num_classes: outputs of ``fc``.
        in_channels: input channels (1 for grayscale, 3 for RGB).
        stem: ``"imagenet"`` or ``"cifar"``.
        zero_init_residual: start each block's last BN at zero (helps short training).
        widths: channels of the stem and the four stages; torchvision's by default. Only the
            tiny test model changes them, so every code path runs in milliseconds in tests.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: Stem = "imagenet",
        zero_init_residual: bool = False,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', not {stem!r}")
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


def stage_blocks(model: nn.Module) -> list[int] | None:
    """Residual blocks in each of a ResNet's four stages; None for another network."""
    stages = [getattr(model, name, None) for name in STAGE_NAMES]
    if not all(isinstance(s, nn.Sequential) for s in stages):
        return None
    return [len(s) for s in stages]  # type: ignore[arg-type]


def keep_blocks(model: nn.Module, blocks: list[int]) -> None:
    """Keep the first ``blocks[i]`` residual blocks of stage ``i`` (in place): what a
    depth-pruned spec rebuilds.

    Raises:
        UserError: not a ResNet, or a count the architecture does not have.
    """
    have = stage_blocks(model)
    if have is None or len(blocks) != len(have) or any(
            not 1 <= k <= n for k, n in zip(blocks, have, strict=True)):
        raise UserError(f"blocks {blocks}: a ResNet keeps 1 to {have or '?'} blocks in each "
                        "of its four stages")
    for name, k in zip(STAGE_NAMES, blocks, strict=True):
        setattr(model, name, getattr(model, name)[:k])


ARCHITECTURES: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}
