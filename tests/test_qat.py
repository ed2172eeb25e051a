"""Quantization-aware training: BN folding, ONNX Runtime's exact int8 arithmetic, observers,
stripping, and a short run through the one training loop."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from onnx import TensorProto
from onnxruntime.quantization.quant_utils import (
    compute_scale_zp,
    get_qmin_qmax_for_qType,
    quantize_data,
)
from torch import Tensor, nn

from netshrink.data.base import ArraySplit, DataBundle, DatasetInfo
from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model
from netshrink.models.fold import batchnorm_pairs, fold_batchnorm
from netshrink.models.resnet import Conv2d
from netshrink.quant.qat import (
    ActivationFakeQuant,
    ObserverFreezeHook,
    QATConfig,
    QATConv2d,
    QATLinear,
    activation_qparams,
    activation_ranges,
    freeze_observers,
    prepare_qat,
    quantize_weight,
    run_qat,
    strip_qat,
    weight_scale,
)

SIZE = 16
TINY = ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1, stem="cifar")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so a wrong fold shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) * 1.3 + 0.2)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(build_model(TINY))


def tiny_data(n: int = 64) -> DataBundle:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    split = ArraySplit(images, torch.arange(n) % 10, (0.5,), (0.25,))
    info = DatasetInfo("tiny", 10, 1, SIZE, [str(i) for i in range(10)], (0.5,), (0.25,))
    return DataBundle(info=info, train=split, val=None, test=split, calib=split)


def batch(n: int = 8, seed: int = 1) -> Tensor:
    return torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def snr_db(approx: Tensor, ref: Tensor) -> float:
    noise = (approx - ref).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-30)))


def conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def ort_int8(weight: Tensor, *, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's own weight quantization (its per-channel loop: quantize_data per
    output channel, symmetric int8, no reduced range)."""
    w = weight.detach().cpu().numpy().astype(np.float32)
    if not per_channel:
        _, scale, q = quantize_data(w.ravel(), TensorProto.INT8, True)
        return np.asarray(q).reshape(w.shape), np.asarray(scale)
    qs, scales = [], []
    for c in range(w.shape[0]):
        _, scale, q = quantize_data(w[c].ravel(), TensorProto.INT8, True)
        qs.append(np.asarray(q).reshape(w.shape[1:]))
        scales.append(float(scale))
    return np.stack(qs), np.asarray(scales, dtype=np.float32)


# --- folding ------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "channels", "size"), [
    ("resnet_tiny", 1, 16),
    ("resnet18", 3, 32),
    pytest.param("resnet50", 3, 32, marks=pytest.mark.slow),  # bottlenecks: a few seconds
])
def test_fold_matches_eval_output(arch: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = randomize_bn(build_model(ModelSpec(arch=arch, num_classes=10, in_channels=channels)))
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    folded = fold_batchnorm(model)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert rel_err(out, ref) < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # input untouched
    assert conv_names(folded) == conv_names(model)
    assert isinstance(folded.get_submodule("layer1.0.conv1"), Conv2d)  # class kept
    assert not folded.training


def test_fold_pairs_resnet_names() -> None:
    pairs = batchnorm_pairs(tiny())
    assert pairs["bn1"] == "conv1"
    assert pairs["layer1.0.bn2"] == "layer1.0.conv2"
    assert pairs["layer2.0.downsample.1"] == "layer2.0.downsample.0"
    assert len(pairs) == 1 + 4 * 2 + 3  # stem, two per block, three downsamples


def test_fold_channel_pruned_model() -> None:
    from netshrink.prune.channel import ChannelPruneConfig, prune_channels

    pruned = prune_channels(tiny(), ChannelPruneConfig(ratio=0.4, round_to=None),
                            example_input=torch.zeros(1, 1, SIZE, SIZE))
    assert pruned.get_submodule("layer1.0.conv1").out_channels < 8
    randomize_bn(pruned, seed=3)
    x = batch()
    with torch.no_grad():
        assert rel_err(fold_batchnorm(pruned)(x), pruned(x)) < 1e-5


def test_fold_by_names_when_fx_cannot_trace() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)
            self.downsample = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > -1e9:  # data-dependent control flow: fx refuses
                x = self.bn1(self.conv1(x))
            return self.downsample(x)

    model = randomize_bn(Dynamic())
    assert batchnorm_pairs(model) == {"bn1": "conv1", "downsample.1": "downsample.0"}
    x = batch()
    with torch.no_grad():
        assert rel_err(fold_batchnorm(model)(x), model(x)) < 1e-5


def test_fold_refuses_a_bn_without_its_conv() -> None:
    before_conv = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3))
    with pytest.raises(UserError, match="does not directly follow"):
        fold_batchnorm(before_conv)

    class Shared(nn.Module):  # the conv's output is read by the BN and by the add
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    with pytest.raises(UserError, match="cannot be folded"):
        fold_batchnorm(Shared())


# --- ONNX Runtime's arithmetic ------------------------------------------------------------


def test_weight_quantization_equals_onnxruntime() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 3, 3, generator=gen) * torch.logspace(-6, 1, 6).view(-1, 1, 1, 1)
    w[2] = 0.0  # a zero range: ORT's scale 1.0
    w[3, 0, 0, 0] = 1.0 / 127 * 2.5  # exact .5 ties must round to even, as numpy does
    for per_channel in (True, False):
        q, scale = quantize_weight(w, per_channel=per_channel)
        ref_q, ref_scale = ort_int8(w, per_channel=per_channel)
        assert q.dtype == torch.int8
        np.testing.assert_array_equal(q.numpy(), ref_q)
        np.testing.assert_array_equal(scale.numpy(), ref_scale.astype(np.float32))
    assert weight_scale(w)[2] == 1.0


@pytest.mark.parametrize(("lo", "hi"), [(-1.3, 2.7), (0.5, 2.0), (-3.0, -1.0), (0.0, 0.0),
                                        (0.0, 6.1), (-1e-3, 1e-3)])
def test_activation_qparams_equal_onnxruntime(lo: float, hi: float) -> None:
    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.UINT8)
    ref_zp, ref_scale = compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32),
                                         qmin, qmax)
    scale, zp = activation_qparams(torch.tensor(lo), torch.tensor(hi))
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert np.float32(scale) == np.float32(ref_scale)
    assert int(zp) == int(ref_zp)


# --- fake quantization --------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quant_weights_are_on_the_int8_grid(per_channel: bool) -> None:
    prepared = prepare_qat(tiny(), per_channel=per_channel)
    for name, m in prepared.named_modules():
        if not isinstance(m, QATConv2d | QATLinear):
            continue
        fq = m.weight_quant(m.weight).detach()
        scale = weight_scale(m.weight, per_channel=per_channel)
        s = scale.view(-1, *[1] * (fq.ndim - 1)) if per_channel else scale
        levels = fq / s
        assert torch.allclose(levels, levels.round(), atol=1e-3), name
        assert levels.abs().max() <= 127 + 1e-3
        q, _ = quantize_weight(m.weight, per_channel=per_channel)
        assert torch.allclose(q.float() * s, fq, rtol=0, atol=1e-7 * float(scale.max())), name
        rows = fq.flatten(1) if per_channel else fq.flatten()[None]
        assert all(len(torch.unique(r)) <= 255 for r in rows)


def test_prepare_keeps_names_and_gradients_pass_straight_through() -> None:
    model = tiny()
    prepared = prepare_qat(model)
    assert conv_names(prepared) == conv_names(model)
    assert isinstance(prepared.get_submodule("layer1.0.conv1"), QATConv2d)
    assert isinstance(prepared.get_submodule("fc"), QATLinear)
    assert prepared.training
    x = batch().requires_grad_(True)
    prepared(x).square().sum().backward()
    for name, p in prepared.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(("size", "stride"), [(1, 1), (2, 2)])
def test_qat_conv_training_shortcut_for_1x1_outputs_matches_the_conv(size: int,
                                                                     stride: int) -> None:
    torch.manual_seed(0)
    layer = QATConv2d.from_float(nn.Conv2d(4, 6, 3, stride=stride, padding=1))
    x = torch.randn(2, 4, size, size)
    layer.train()
    shortcut = layer(x)  # training: the matmul path (and the observer's first batch)
    layer.eval()
    torch.testing.assert_close(shortcut, layer(x), rtol=1e-5, atol=1e-6)
    assert shortcut.shape == (2, 6, 1, 1)


def test_observer_ema_freeze_and_eval() -> None:
    obs = ActivationFakeQuant()
    obs.eval()
    x = torch.tensor([0.5, 2.0])
    assert torch.equal(obs(x), x)  # nothing observed: passes through
    obs.train()
    obs(torch.tensor([-1.0, 3.0]))  # the first batch sets the range
    assert (float(obs.min_val), float(obs.max_val)) == (-1.0, 3.0)
    obs(torch.tensor([1.0, 5.0]))  # then an EMA with momentum 0.01
    assert float(obs.min_val) == pytest.approx(-1.0 + 0.01 * 2.0)
    assert float(obs.max_val) == pytest.approx(3.0 + 0.01 * 2.0)
    obs.eval()
    obs(torch.tensor([-100.0, 100.0]))  # eval does not observe
    assert float(obs.max_val) == pytest.approx(3.02)
    obs.train()
    obs.frozen.fill_(True)
    obs(torch.tensor([-100.0, 100.0]))
    assert float(obs.max_val) == pytest.approx(3.02)
    out = obs(torch.tensor([-2.0, 0.0, 1.234, 10.0]))
    scale, zp = obs.qparams()
    assert float(out[1]) == 0.0  # zero is exact
    assert float(out[0]) == pytest.approx(-float(zp) * float(scale))  # clipped to rmin
    assert float(out[3]) == pytest.approx((255 - float(zp)) * float(scale))


def test_ranges_include_zero_and_the_hook_freezes() -> None:
    prepared = prepare_qat(tiny())
    hook = ObserverFreezeHook(2)
    for step in range(4):
        prepared(batch(seed=step).abs())  # an all-positive input: rmin must still be 0
        hook(prepared)
        if step == 1:
            frozen_ranges = activation_ranges(prepared)
    assert hook.frozen
    ranges = activation_ranges(prepared)
    assert ranges == frozen_ranges
    assert list(ranges) == conv_names(prepared)
    assert all(lo <= 0.0 <= hi and hi > lo for lo, hi in ranges.values())
    assert ranges["conv1"][0] == 0.0
    assert freeze_observers(prepared, frozen=False) == len(ranges)
    prepared(batch(seed=9) * 50)
    assert activation_ranges(prepared)["conv1"] != ranges["conv1"]


def test_activation_ranges_need_observed_data() -> None:
    with pytest.raises(UserError, match="seen no data"):
        activation_ranges(prepare_qat(tiny()))
    with pytest.raises(UserError, match="prepare_qat"):
        activation_ranges(tiny())


# --- stripping and ONNX Runtime -----------------------------------------------------------


def calibrated() -> nn.Module:
    prepared = prepare_qat(tiny())
    for seed in range(3):
        prepared(batch(16, seed=seed))
    return prepared.eval()


def test_strip_gives_float_model_close_to_the_fake_quantized_one() -> None:
    prepared = calibrated()
    stripped = strip_qat(prepared)
    assert not any(isinstance(m, QATConv2d | QATLinear | ActivationFakeQuant)
                   for m in stripped.modules())
    assert isinstance(prepared.get_submodule("conv1"), QATConv2d)  # input untouched
    assert type(stripped.get_submodule("layer1.0.conv1")) is Conv2d
    assert conv_names(stripped) == conv_names(prepared)
    assert not stripped.training
    x = batch(16, seed=5)
    with torch.no_grad():
        fq, float_out = prepared(x), stripped(x)
        folded = fold_batchnorm(tiny())(x)
    # Only the activation quantization separates them: quantization noise, not an error.
    assert snr_db(float_out, fq) > 25
    assert snr_db(float_out, folded) > 25  # weight rounding alone is small noise too
    for name, m in prepared.named_modules():
        if isinstance(m, QATConv2d | QATLinear):
            on_grid = stripped.get_submodule(name).weight
            torch.testing.assert_close(on_grid, m.weight_quant(m.weight).detach(),
                                       rtol=0, atol=1e-6 * float(m.weight.detach().abs().max()))


@pytest.mark.parametrize("per_channel", [True, False])
def test_onnxruntime_requantizes_stripped_weights_to_the_same_int8(per_channel: bool) -> None:
    prepared = prepare_qat(tiny(), per_channel=per_channel)
    prepared(batch())
    stripped = strip_qat(prepared)
    for name, m in prepared.named_modules():
        if not isinstance(m, QATConv2d | QATLinear):
            continue
        ours, scale = quantize_weight(m.weight, per_channel=per_channel)
        ref_q, ref_scale = ort_int8(stripped.get_submodule(name).weight,
                                    per_channel=per_channel)
        np.testing.assert_array_equal(ref_q, ours.numpy(), err_msg=name)
        np.testing.assert_allclose(ref_scale, scale.numpy(), rtol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's notice
def test_onnxruntime_static_qdq_quantizer_keeps_the_trained_int8_weights(tmp_path) -> None:
    """End to end: export the stripped model, quantize it with ORT's own static QDQ
    quantizer (per channel), and find exactly our int8 values in its initializers."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": batch(1, seed=i).numpy()} for i in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = calibrated()
    stripped = strip_qat(prepared)
    float_path, int8_path = tmp_path / "qat.onnx", tmp_path / "qat_int8.onnx"
    torch.onnx.export(stripped, (batch(1),), str(float_path), dynamo=False,
                      input_names=["input"], output_names=["logits"])
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(float_path)).graph.node)
    quantize_static(str(float_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(int8_path)).graph.initializer}
    layers = [(n, m) for n, m in prepared.named_modules() if isinstance(m, QATConv2d | QATLinear)]
    for name, m in layers:
        ours, _ = quantize_weight(m.weight)
        np.testing.assert_array_equal(inits[f"{name}.weight_quantized"], ours.numpy(),
                                      err_msg=name)


# --- config and training ------------------------------------------------------------------


def test_qat_config_builds_a_train_config() -> None:
    cfg = QATConfig(epochs=0.5, batch_size=32)
    train_cfg = cfg.train_config(n_train=600)  # 19 steps per epoch
    assert (train_cfg.epochs, train_cfg.max_steps) == (1, 10)
    assert train_cfg.lr == 0.005 and train_cfg.batch_size == 32
    assert QATConfig(epochs=2, max_steps=5).train_config(600).max_steps == 5
    with pytest.raises(pydantic.ValidationError):
        QATConfig(epochs=0)
    with pytest.raises(pydantic.ValidationError):
        QATConfig(freeze_observers_after=0)
    with pytest.raises(pydantic.ValidationError):
        QATConfig(bogus=1)


def test_run_qat_trains_freezes_and_returns_on_grid_weights() -> None:
    model = tiny()
    data = tiny_data()
    cfg = QATConfig(epochs=1.5, batch_size=32, freeze_observers_after=0.5)  # 3 steps
    lines: list[str] = []
    stripped, ranges, result = run_qat(model, data, cfg, log=lines.append, progress=False)
    assert result.steps == 3 and len(result.history) == 2 and len(lines) == 2
    assert list(ranges) == conv_names(model)
    assert all(lo <= 0.0 <= hi for lo, hi in ranges.values())
    assert not any(isinstance(m, nn.BatchNorm2d | QATConv2d) for m in stripped.modules())
    assert not stripped.training
    untrained = strip_qat(prepare_qat(model))
    changed = False
    for name, m in stripped.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            q, scale = quantize_weight(m.weight)
            s = scale.view(-1, *[1] * (m.weight.ndim - 1))
            torch.testing.assert_close(q.float() * s, m.weight.detach(), rtol=0,
                                       atol=1e-6 * float(scale.max()))
            changed |= not torch.equal(m.weight, untrained.get_submodule(name).weight)
    assert changed  # training moved weights to other grid points
    with torch.no_grad():
        assert torch.isfinite(stripped(batch())).all()
