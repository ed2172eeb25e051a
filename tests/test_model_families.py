"""The CNN families people use, each built small here (no torchvision), through the whole
way: channel pruning at 0.3 -> static INT8 in ONNX Runtime -> save with the factory below
-> load (trusted) -> measure.

Each family carries the structure that makes it hard to prune: depthwise convs and
residual adds (MobileNetV2), squeeze-excitation gates with hardswish (MobileNetV3) or
SiLU (EfficientNet), grouped convs (RegNet, ResNeXt), dense concatenation (DenseNet), a
channel split and shuffle (ShuffleNetV2), fire modules (SqueezeNet), inception branches
(GoogLeNet), a flatten into linear layers (VGG), and depthwise 7x7 convs with
channels-last layer norms and a per-channel layer scale (ConvNeXt). Tiny widths and
32x32 inputs keep every case to about a second.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import netshrink
from netshrink.errors import UserError

SIZE = 32
CLASSES = 10


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act is not None else []))


class Head(nn.Module):
    """Global pooling and a linear classifier."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------- inverted residuals


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeezed: int, gate: type[nn.Module]) -> None:
        super().__init__()
        self.fc1, self.fc2, self.gate = nn.Conv2d(c, squeezed, 1), nn.Conv2d(squeezed, c, 1), gate()

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """1x1 expand, depthwise 3x3, optional squeeze-excitation, 1x1 project, residual add."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int,
                 act: type[nn.Module], se: type[nn.Module] | None) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn(cin, mid, 1, act=act)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid, act=act)
        self.se = SqueezeExcite(mid, max(8, mid // 4), se) if se is not None else nn.Identity()
        self.project = conv_bn(mid, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetLike(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.ReLU6, se: type[nn.Module] | None = None
                 ) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=act)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 4, act, se),
                                    InvertedResidual(16, 24, 2, 4, act, se),
                                    InvertedResidual(24, 24, 1, 4, act, se))
        self.last = conv_bn(24, 64, 1, act=act)
        self.head = Head(64)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.last(self.blocks(self.stem(x))))


def build_mobilenet_v2() -> nn.Module:
    return MobileNetLike(nn.ReLU6)


def build_mobilenet_v3() -> nn.Module:
    return MobileNetLike(nn.Hardswish, se=nn.Hardsigmoid)


def build_efficientnet() -> nn.Module:
    return MobileNetLike(nn.SiLU, se=nn.Sigmoid)


# ---------------------------------------------------------------- grouped bottlenecks


class GroupedBottleneck(nn.Module):
    """1x1 reduce, grouped 3x3, 1x1 expand, residual add (projected when shapes change)."""

    def __init__(self, cin: int, cout: int, width: int, groups: int, stride: int) -> None:
        super().__init__()
        self.a = conv_bn(cin, width, 1)
        self.b = conv_bn(width, width, 3, stride, groups=groups)
        self.c = conv_bn(width, cout, 1, act=None)
        self.proj = (conv_bn(cin, cout, 1, stride, act=None)
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.proj(x) + self.c(self.b(self.a(x))))


class GroupedNet(nn.Module):
    def __init__(self, widths: tuple[int, int], groups: tuple[int, int]) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.stage1 = GroupedBottleneck(32, 32, widths[0], groups[0], 1)
        self.stage2 = GroupedBottleneck(32, 64, widths[1], groups[1], 2)
        self.head = Head(64)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))))


def build_regnet() -> nn.Module:
    return GroupedNet(widths=(32, 64), groups=(2, 4))  # group width 16, as RegNetX's


def build_resnext() -> nn.Module:
    return GroupedNet(widths=(64, 128), groups=(4, 4))  # cardinality 4, 16 and 32 wide


# ---------------------------------------------------------------- concatenations


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm(x))))))
        return torch.cat([x, y], 1)


class DenseNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(16, 16), DenseLayer(32, 16))
        self.transition = nn.Sequential(nn.BatchNorm2d(48), nn.ReLU(),
                                        nn.Conv2d(48, 32, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(32, 16), DenseLayer(48, 16))
        self.norm = nn.BatchNorm2d(64)
        self.head = Head(64)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        return self.head(F.relu(self.norm(x)))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: split (stride 1) or two branches (stride 2), concat, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride == 2:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin, act=None),
                                         conv_bn(cin, half, 1))
        self.branch2 = nn.Sequential(conv_bn(cin if stride == 2 else half, half, 1),
                                     conv_bn(half, half, 3, stride, groups=half, act=None),
                                     conv_bn(half, half, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 24, 3, 2)
        self.units = nn.Sequential(ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1),
                                   ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1))
        self.last = conv_bn(96, 128, 1)
        self.head = Head(128)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.last(self.units(self.stem(x))))


def build_densenet() -> nn.Module:
    return DenseNetLike()


def build_shufflenet() -> nn.Module:
    return ShuffleNetLike()


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1(s)), F.relu(self.expand3(s))], 1)


def build_squeezenet() -> nn.Module:
    # SqueezeNet's classifier is a 1x1 conv to the classes, pooled: no linear layer.
    return nn.Sequential(nn.Conv2d(3, 32, 3, 2), nn.ReLU(), Fire(32, 16, 32), Fire(64, 16, 32),
                         nn.MaxPool2d(2), Fire(64, 16, 48), nn.Dropout(0.5),
                         nn.Conv2d(96, CLASSES, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3: tuple[int, int], c5: tuple[int, int], pool: int
                 ) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3 = nn.Sequential(conv_bn(cin, c3[0], 1), conv_bn(c3[0], c3[1], 3))
        self.b5 = nn.Sequential(conv_bn(cin, c5[0], 1), conv_bn(c5[0], c5[1], 3))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pool, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


def build_googlenet() -> nn.Module:
    return nn.Sequential(conv_bn(3, 32, 3, 2), Inception(32, 16, (16, 24), (8, 16), 16),
                         Inception(72, 24, (24, 32), (8, 16), 16), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(88, CLASSES))


def build_vgg() -> nn.Module:
    # The flatten of a 4x4 map into the classifier: each channel is 16 of its inputs.
    return nn.Sequential(conv_bn(3, 16), nn.MaxPool2d(2), conv_bn(16, 32), nn.MaxPool2d(2),
                         conv_bn(32, 32), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(64, CLASSES))


# ---------------------------------------------------------------- ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """A layer norm over the channels of an NCHW map (ConvNeXt's downsampling norm)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.layer_scale = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.pw2(F.gelu(self.pw1(y))) * self.layer_scale
        return x + y.permute(0, 3, 1, 2)


def build_convnext() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 4, 4), LayerNorm2d(32), ConvNeXtBlock(32),
                         LayerNorm2d(32), nn.Conv2d(32, 64, 2, 2), ConvNeXtBlock(64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(64),
                         nn.Linear(64, CLASSES))


FAMILIES = ["mobilenet_v2", "mobilenet_v3", "efficientnet", "regnet", "resnext", "densenet",
            "shufflenet", "squeezenet", "googlenet", "vgg", "convnext"]


# ---------------------------------------------------------------- the way through


def randomised(model: nn.Module) -> nn.Module:
    """``model`` with BN statistics and affine values away from the identity, in eval mode
    (a fresh init's outputs are nearly constant, which would hide a wrong channel)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def snr_db(want: Tensor, got: Tensor) -> float:
    noise = (want - got).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(want.pow(2).mean().item() / noise)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_goes_the_whole_way(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomised(globals()[f"build_{family}"]())
    x = torch.randn(4, 3, SIZE, SIZE)
    pruned = netshrink.prune(model, netshrink.ChannelPruneConfig(ratio=0.3),
                             example_input=x[:1])
    assert params(pruned.model) < 0.9 * params(model)  # channels really went
    with torch.no_grad():
        out = pruned.model(x)
    assert out.shape == (4, CLASSES) and bool(torch.isfinite(out).all())

    calib = [(torch.randn(16, 3, SIZE, SIZE), torch.zeros(16, dtype=torch.long))]
    int8 = netshrink.quantize(pruned, netshrink.PTQConfig(), calibration=calib,
                              out=tmp_path / "int8")
    assert int8.precision == "int8"
    assert snr_db(out, int8(x)) > 15  # INT8 keeps the signal: within ~18% RMS of torch

    factory = f"test_model_families:build_{family}"
    saved = pruned.save(tmp_path / "pruned.safetensors", factory=factory)
    loaded = netshrink.load(saved, trust=[factory])
    with torch.no_grad():
        assert torch.equal(loaded.model(x), out)
    measured = netshrink.measure(loaded, example_input=x[:1], options=netshrink.MeasureOptions(
        latency=False, memory=False))
    assert measured.params == params(pruned.model)


def test_grouped_convs_lose_whole_positions_of_every_group() -> None:
    """RegNet's grouped 3x3 keeps its groups, each narrower by the same channels, rounded
    per group to the kernels' multiple of 8 (16 wide each: 0.3 asks 11, 8 kept)."""
    model = randomised(build_regnet())
    pruned = netshrink.prune(model, netshrink.ChannelPruneConfig(ratio=0.3),
                             example_input=torch.zeros(1, 3, SIZE, SIZE)).model
    b = pruned.stage2.b[0]
    assert (b.groups, b.in_channels, b.out_channels) == (4, 32, 32)
    unrounded = netshrink.prune(model, netshrink.ChannelPruneConfig(ratio=0.3, round_to=None),
                                example_input=torch.zeros(1, 3, SIZE, SIZE)).model
    b = unrounded.stage2.b[0]
    assert (b.groups, b.in_channels, b.out_channels) == (4, 44, 44)  # 11 of 16 per group


def test_a_channel_shuffle_keeps_the_channels_it_carries() -> None:
    """The channels through ShuffleNet's shuffle stay; those inside each branch go."""
    model = randomised(build_shufflenet())
    pruned = netshrink.prune(model, netshrink.ChannelPruneConfig(ratio=0.5, round_to=None),
                             example_input=torch.zeros(1, 3, SIZE, SIZE)).model
    unit = pruned.units[1]
    assert unit.branch2[0][0].out_channels == 12  # inside the branch: half of 24
    assert unit.branch2[2][0].out_channels == 24  # into the concat and shuffle: all
    assert pruned.units[3].branch2[2][0].out_channels == 48


class TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, 8)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.fc(self.attn(t, t, t)[0].mean(1))


class FixedView(nn.Module):
    """A forward that hard-codes a width: ``view(-1, 32 * 8 * 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1)
        self.fc = nn.Linear(32 * 8 * 8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv2(F.relu(self.conv1(x))).view(-1, 32 * 8 * 8))


def build_fixed_view() -> nn.Module:
    return FixedView()


class DictOut(nn.Module):
    """A forward that returns a dict, not the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.conv(x).mean((2, 3)), "features": x}


@pytest.mark.parametrize("config", [
    netshrink.ChannelPruneConfig(ratio=0.3), netshrink.MagnitudePruneConfig(ratio=0.5),
    netshrink.NMPruneConfig(), netshrink.BlockPruneConfig(count=1)],
    ids=lambda c: type(c).__name__)
def test_a_model_a_method_cannot_handle_gets_one_line(config: object) -> None:
    for model in (TinyViT().eval(), FixedView().eval(), DictOut().eval()):
        try:
            netshrink.prune(model, config, example_input=torch.zeros(1, 3, SIZE, SIZE),
                            data=[(torch.zeros(4, 3, SIZE, SIZE), torch.zeros(4).long())])
        except UserError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 400
    with pytest.raises(UserError, match="attention"):
        netshrink.prune(TinyViT().eval(), netshrink.ChannelPruneConfig(ratio=0.3),
                        example_input=torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(UserError, match="returns a dict"):
        netshrink.prune(DictOut().eval(), netshrink.ChannelPruneConfig(ratio=0.3),
                        example_input=torch.zeros(1, 3, SIZE, SIZE))


def test_a_fixed_width_in_the_forward_is_one_line_not_a_traceback() -> None:
    with pytest.raises(UserError, match="no longer runs"):
        netshrink.prune(FixedView().eval(), netshrink.ChannelPruneConfig(ratio=0.3),
                        example_input=torch.zeros(1, 3, SIZE, SIZE))


def test_int8_of_a_model_onnx_cannot_take_is_one_line(tmp_path: Path) -> None:
    calib = [(torch.randn(4, 3, SIZE, SIZE), torch.zeros(4, dtype=torch.long))]
    for model in (DictOut().eval(), TinyViT().eval()):
        try:
            netshrink.quantize(model, netshrink.PTQConfig(), calibration=calib,
                               out=tmp_path / type(model).__name__)
        except UserError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 400


def test_a_factory_that_will_not_rebuild_the_model_is_refused_at_save(tmp_path: Path) -> None:
    pruned = netshrink.prune(randomised(build_vgg()), netshrink.ChannelPruneConfig(ratio=0.3),
                             example_input=torch.zeros(1, 3, SIZE, SIZE))
    path = tmp_path / "vgg.safetensors"
    with pytest.raises(UserError, match=r"not saved.*do not fit the model"):
        pruned.save(path, factory="test_model_families:build_googlenet")
    assert not path.exists()
    # A forward that fixes a width: the weights fit the rebuilt layers, the forward not.
    narrow = FixedView().eval()
    narrow.conv2, narrow.fc = nn.Conv2d(16, 24, 3, 2, 1), nn.Linear(24 * 8 * 8, CLASSES)
    result = netshrink.Compressed(model=narrow, input_shape=[3, SIZE, SIZE])
    with pytest.raises(UserError, match=r"not saved.*does not run"):
        result.save(path, factory="test_model_families:build_fixed_view")
    assert not path.exists()
    netshrink.Compressed(model=FixedView().eval(), input_shape=[3, SIZE, SIZE]).save(
        path, factory="test_model_families:build_fixed_view")  # its own widths: saved
    assert netshrink.load(path, trust=["test_model_families:build_fixed_view"]).model
    with pytest.raises(UserError, match=r"not saved.*cannot import"):
        pruned.save(tmp_path / "other.safetensors", factory="no_such_module_here:build")
    assert not (tmp_path / "other.safetensors").exists()


def test_a_pruning_stage_slower_than_its_input_says_so() -> None:
    from netshrink.recipe.slower import note_if_slower
    from netshrink.stages.record import StageRecord
    from report_records import _measurement

    def record(name: str, kind: str, p50: float, **config: object) -> StageRecord:
        return StageRecord(index=0, name=name, kind=kind, config=config, started="now",
                           measurement=_measurement(10, 1000, 1000, p50, 0.9))

    base = record("baseline", "baseline", 10.0)
    lines: list[str] = []
    slow = record("channels", "prune.channel", 13.0, round_to=None)
    note_if_slower(slow, [base], "baseline", lines.append)
    assert slow.notes == [lines[0].split(": ", 1)[1]]
    assert "slower than its input baseline: batch-1 latency 1.30x" in slow.notes[0]
    assert "round_to: auto" in slow.notes[0]
    rounded = record("channels", "prune.channel", 13.0, round_to="auto")
    note_if_slower(rounded, [base], "baseline", lines.append)
    assert "round_to: 16" in rounded.notes[0]
    for fine in (record("channels", "prune.channel", 7.0, round_to="auto"),  # faster
                 record("channels", "prune.channel", 10.2, round_to="auto"),  # within noise
                 record("tuned", "finetune", 13.0)):  # not a pruning stage
        note_if_slower(fine, [base], "baseline", lines.append)
        assert fine.notes == []


def test_an_importance_that_ranks_nothing_is_one_line() -> None:
    """bn_scale on SqueezeNet, which has no batch norm: every scope says so."""
    for scope in ("layer", "global"):
        with pytest.raises(UserError, match="cannot rank any channel"):
            netshrink.prune(build_squeezenet().eval(), netshrink.ChannelPruneConfig(
                ratio=0.3, importance="bn_scale", scope=scope),
                example_input=torch.zeros(1, 3, SIZE, SIZE))


class ReadsValues(nn.Module):
    """A forward that reads a value (``.item()``): it cannot run on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3), nn.Linear(16, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x).mean((2, 3))
        return self.fc(y * 2 if float(y.abs().max().item()) > 100 else y)


def build_reads_values() -> nn.Module:
    return ReadsValues()


def test_a_forward_the_meta_device_cannot_run_is_checked_for_real(tmp_path: Path) -> None:
    pruned = netshrink.prune(ReadsValues().eval(), netshrink.ChannelPruneConfig(ratio=0.5),
                             example_input=torch.zeros(1, 3, SIZE, SIZE))
    path = pruned.save(tmp_path / "r.safetensors", factory="test_model_families:build_reads_values")
    loaded = netshrink.load(path, trust=["test_model_families:build_reads_values"])
    assert loaded.model.conv.out_channels == 8
