"""Quantization into real runtimes: ONNX export, static INT8 (ONNX Runtime, OpenVINO),
mixed precision, zeros kept, packed files, recipe stages, and the errors users hit."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from netshrink.cli import main
from netshrink.errors import UserError
from netshrink.export import check_onnx, export_onnx, onnx_layer_name
from netshrink.models import ModelSpec, randomized_model
from netshrink.prune import MagnitudePruneConfig, prune_magnitude
from netshrink.quant.calibration import calibration_batches
from netshrink.quant.ptq import (
    PTQConfig,
    auto_mixed,
    quantizable_layers,
    quantize_onnx,
    quantize_openvino,
)
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.runtime import model_stats, open_runtime, require
from netshrink.store.packed_onnx import pack_onnx, unpack_onnx

SHAPE = [1, 28, 28]


def randomized(arch: str = "resnet18") -> nn.Module:
    return randomized_model(ModelSpec(arch=arch, num_classes=10, in_channels=1))


def calib(n: int = 3) -> list[np.ndarray]:
    gen = np.random.default_rng(0)
    return [gen.standard_normal((16, *SHAPE), dtype=np.float32) for _ in range(n)]


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


@pytest.fixture(scope="module")
def r18(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = randomized()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "fp32.onnx", input_shape=SHAPE)
    return model, path


def int8_weights(path: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path)).graph
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2}


def quantized_layers(path: Path) -> set[str]:
    """Torch names of the conv/linear layers whose weights come through DequantizeLinear."""
    graph = onnx.load(str(path)).graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {onnx_layer_name(n.name) for n in graph.node
            if n.op_type in ("Conv", "Gemm") and n.input[1] in dq_outputs}


def test_export_passes_checker_matches_torch_and_names_layers(r18) -> None:
    model, path = r18
    assert check_onnx(path, model, input_shape=SHAPE) < 1e-4
    layers = quantizable_layers(path)
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert sorted(layers) == sorted(convs)  # every conv/linear maps to its ONNX node
    assert onnx_layer_name("/layer2/layer2.0/downsample/downsample.0/Conv") == \
        "layer2.0.downsample.0"


@pytest.mark.parametrize("per_channel", [True, False])
def test_static_int8_is_int8_small_and_close_to_float(r18, tmp_path, per_channel) -> None:
    model, fp32 = r18
    out = quantize_onnx(fp32, tmp_path / "int8.onnx", calib(), PTQConfig(per_channel=per_channel))
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = int8_weights(out)
    assert len(weights) == 21  # 20 convs + fc, all int8
    assert out.stat().st_size <= 0.26 * fp32.stat().st_size
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    stats = model_stats(model, SHAPE)
    ort_out = open_runtime(out, "onnxruntime", stats=stats)(x)
    assert snr_db(ref, ort_out) > 20
    ov_out = open_runtime(out, "openvino", stats=stats, precision="int8")(x)
    assert snr_db(ref, ov_out) > 20  # the same QDQ file runs in OpenVINO


def test_openvino_nncf_quantizes_and_keeps_fc_float(r18, tmp_path) -> None:
    model, fp32 = r18
    (tmp_path / "ov").mkdir()
    xml = quantize_openvino(fp32, tmp_path / "ov" / "model.xml", calib(),
                            PTQConfig(runtime="openvino", keep_float=["fc"]))
    assert xml.with_suffix(".bin").stat().st_size < 0.3 * fp32.stat().st_size
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    out = open_runtime(tmp_path / "ov", "openvino", stats=model_stats(model, SHAPE),
                       precision="int8")(x)
    assert snr_db(ref, out) > 20


def test_openvino_runs_each_batch_size_compiled_for_it_and_returns_its_own_arrays(
        r18) -> None:
    model, fp32 = r18
    module = open_runtime(fp32, "openvino", stats=model_stats(model, SHAPE))
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, *SHAPE, generator=gen) for n in (1, 5, 1, 3)]
    outs = [module(x) for x in batches]  # kept: the runtime's buffers are reused
    with torch.no_grad():
        for x, out in zip(batches, outs, strict=True):
            assert out.shape == (x.shape[0], 10)
            assert torch.allclose(out, model(x), atol=1e-3, rtol=1e-3)
    requests = module._run
    assert sorted(requests.compiled) == [(1, 1, 28, 28), (3, 1, 28, 28), (5, 1, 28, 28)]
    assert all(r is not requests.dynamic for r in requests.compiled.values())


def test_keep_float_leaves_named_layers_in_float(r18, tmp_path) -> None:
    _, fp32 = r18
    out = quantize_onnx(fp32, tmp_path / "mixed.onnx", calib(),
                        PTQConfig(keep_float=["fc", "layer4.*"]))
    layers = quantized_layers(out)
    assert len(layers) == 21 - 6  # layer4 has 5 convs; with fc, 6 stay float
    assert not any(layer.startswith(("layer4", "fc")) for layer in layers)
    assert len(int8_weights(out)) == 21 - 6
    with pytest.raises(UserError, match=r"'layer9.\*' matches no quantizable layer; layers: conv1"):
        quantize_onnx(fp32, tmp_path / "bad.onnx", calib(), PTQConfig(keep_float=["layer9.*"]))


def test_pruned_zeros_stay_zero_in_int8_and_the_packed_file(tmp_path) -> None:
    model = randomized()
    model, _ = prune_magnitude(model, MagnitudePruneConfig(ratio=0.5, exclude=["fc"]))
    model.eval()
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", input_shape=SHAPE)
    out = quantize_onnx(fp32, tmp_path / "int8.onnx", calib(), PTQConfig())
    zeros = {name: int((layer.weight == 0).sum()) for name, layer in model.named_modules()
             if isinstance(layer, nn.Conv2d)}
    int8_zero = sum(int((w == 0).sum()) for w in int8_weights(out).values())
    assert sum(zeros.values()) > 5_000_000
    assert int8_zero >= sum(zeros.values())  # every pruned weight is an int8 zero
    packed = tmp_path / "int8.nspk"
    pack_onnx(out, packed)
    dense_float = sum(p.numel() * 4 for p in model.parameters())
    assert packed.stat().st_size <= 0.18 * dense_float
    restored = tmp_path / "restored.onnx"
    restored.write_bytes(unpack_onnx(packed))
    x = torch.randn(4, *SHAPE)
    stats = model_stats(model, SHAPE)
    a = open_runtime(out, "onnxruntime", stats=stats)(x)
    b = open_runtime(restored, "onnxruntime", stats=stats)(x)
    assert torch.equal(a, b)


@pytest.mark.slow  # ~24 s: a ResNet-18 quantized layer by layer; the compress tests run it
def test_auto_mixed_returns_the_most_sensitive_layers_to_float(r18, tmp_path) -> None:
    _, fp32 = r18
    layers = quantizable_layers(fp32)
    harm = {"conv1": 0.02, "fc": 0.01}  # what quantizing each layer costs, in top-1

    def top1(path: Path) -> float:
        return 0.9 - sum(harm.get(layer, 0.0001) for layer in quantized_layers(path))

    _, kept, trace = auto_mixed(fp32, tmp_path / "auto.onnx", calib(1), PTQConfig(),
                                top1=top1, budget=0.5, log=lambda _: None)
    assert kept == ["conv1", "fc"]  # most sensitive first, then stop within budget
    assert trace[0]["step"] == "all int8" and len(trace) == 3
    assert len(layers) == 21


def test_calibration_and_config_errors(r18, tmp_path, fashion_dir) -> None:
    from netshrink.data import DataConfig, build_data

    _, fp32 = r18
    data = build_data(DataConfig(root=fashion_dir, val_size=0, calib_size=8))
    with pytest.raises(UserError, match=r"calibration images have shape \[1, 28, 28\] but the "
                                        r"model takes \[3, 32, 32\]"):
        calibration_batches(data.calib, input_shape=[3, 32, 32])
    with pytest.raises(UserError, match=r"calibration set is empty; set data\.calib_size"):
        calibration_batches(data.calib.subset(torch.arange(0)), input_shape=SHAPE)
    with pytest.raises(UserError, match="calibration set is empty"):
        quantize_onnx(fp32, tmp_path / "x.onnx", [], PTQConfig())
    with pytest.raises(UserError, match=r"bits must be 8 \(got 4\); for fewer bits per weight "
                                        "use quant.kmeans"):
        parse_recipe({"stages": [{"kind": "quant.ptq", "bits": 4}]})
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", calib(1), PTQConfig())
    with pytest.raises(UserError, match="already quantized"):
        quantize_onnx(int8, tmp_path / "twice.onnx", calib(1), PTQConfig())
    assert not (tmp_path / "twice.onnx").exists()


def test_missing_runtime_names_the_extra(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name.split(".")[0] == "openvino":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    monkeypatch.delitem(__import__("sys").modules, "openvino", raising=False)
    with pytest.raises(UserError, match=r"openvino is not installed; install it with: "
                                        r"pip install 'netshrink\[openvino\]'"):
        require("openvino")


def test_recipe_quant_stages_measure_in_their_runtimes(fashion_dir, tmp_path, capsys) -> None:
    raw = {
        "name": "q",
        "model": {"arch": "resnet_tiny"},
        "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 100,
                 "calib_size": 64},
        "measure": {"latency": False, "batch_size": 16},
        "stages": [
            {"kind": "train", "epochs": 3, "lr": 0.05, "batch_size": 32},
            {"kind": "export.onnx"},
            {"kind": "quant.ptq", "name": "ptq"},
            {"kind": "quant.ptq", "name": "ptq-ov", "runtime": "openvino"},
            {"kind": "quant.dynamic"},
            {"kind": "quant.fp16"},
            {"kind": "quant.qat", "epochs": 0.5, "batch_size": 32},
            {"kind": "quant.kmeans", "bits": 4},
        ],
    }
    record = run_recipe(parse_recipe(raw), tmp_path, log=lambda _: None, report=False)
    by_name = {s.name: s.measurement for s in record.stages}
    assert {n: (m.runtime, m.precision) for n, m in by_name.items() if n != "baseline"} == {
        "train": ("torch", "fp32"), "export.onnx": ("onnxruntime", "fp32"),
        "ptq": ("onnxruntime", "int8"), "ptq-ov": ("openvino", "int8"),
        "quant.dynamic": ("onnxruntime", "int8-dynamic"), "quant.fp16": ("torch", "fp16"),
        "quant.qat": ("onnxruntime", "int8"), "quant.kmeans": ("torch", "fp32, 4-bit k-means")}
    float_top1 = by_name["train"].accuracy.top1
    assert float_top1 >= 0.9
    assert by_name["export.onnx"].accuracy.top1 == pytest.approx(float_top1)
    for name in ("ptq", "ptq-ov", "quant.qat", "quant.fp16"):
        assert by_name[name].accuracy.top1 >= float_top1 - 0.05, name
    float_size = by_name["train"].size_bytes
    assert by_name["quant.fp16"].size_bytes < 0.55 * float_size
    assert by_name["ptq"].sizes["packed"] < by_name["ptq"].size_bytes
    assert by_name["quant.kmeans"].size_bytes < 0.2 * float_size
    # A changed measure section re-measures every finished stage in its own runtime.
    raw["measure"] = {"latency": False, "batch_size": 8}
    again = run_recipe(parse_recipe(raw), tmp_path, log=lambda _: None, report=False)
    assert again.stages[0].measurement.accuracy is None  # still the untrained start
    for old, new in zip(record.stages[1:], again.stages[1:], strict=True):
        assert (new.measurement.runtime, new.measurement.accuracy.top1) == \
            (old.measurement.runtime, old.measurement.accuracy.top1)
    # And the CLI refuses to quantize what is already quantized.
    capsys.readouterr()
    code = main(["quantize", "--weights", str(tmp_path / "stages" / "03-ptq" / "model.onnx"),
                 "--method", "ptq", "--data-dir", str(fashion_dir), "--out",
                 str(tmp_path / "again")])
    err = capsys.readouterr().err
    assert code == 2 and "already quantized (int8)" in err and not (tmp_path / "again").exists()
