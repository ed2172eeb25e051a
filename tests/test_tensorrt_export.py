"""TensorRT-ready export: the three ONNX forms run in ONNX Runtime close to torch, follow
TensorRT's documented Q/DQ rules (checked statically: no TensorRT here), come with the
exact trtexec commands, and work as a recipe stage."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from netshrink.errors import UserError
from netshrink.export.tensorrt import (
    FILES,
    convert_fp16,
    export_tensorrt,
    quantize_int8,
    tensorrt_problems,
    trtexec_commands,
)
from netshrink.models import ModelSpec, randomized_model
from netshrink.quant.ptq import PTQConfig, quantize_onnx
from netshrink.recipe import parse_recipe, run_recipe

SHAPE = [3, 32, 32]


def calib(n: int = 2, batch: int = 16) -> list[np.ndarray]:
    gen = np.random.default_rng(0)
    return [gen.standard_normal((batch, *SHAPE), dtype=np.float32) for _ in range(n)]


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(ref**2) / np.mean((ref - out) ** 2)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small ResNet (stem, residual adds, downsample shortcuts, fc) with random weights
    and BatchNorm statistics, and its three forms, calibrated on the images it is then
    compared on."""
    model = randomized_model(ModelSpec(arch="resnet_tiny", num_classes=10, stem="cifar"))
    folder = tmp_path_factory.mktemp("trt")
    result = export_tensorrt(model, folder, input_shape=SHAPE, batches=calib(),
                             opt_batch=4, max_batch=16)
    return model, result


def test_every_form_is_valid_onnx_and_close_to_torch(tiny) -> None:
    model, result = tiny
    assert set(result.files) == {"fp32", "fp16", "int8"}
    x = calib(1, 8)[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    outs = {}
    for form, path in result.files.items():
        assert path.name == FILES[form]
        onnx.checker.check_model(str(path), full_check=True)
        outs[form] = run_onnx(path, x)
        assert outs[form].dtype == np.float32  # every form takes and returns float32
    assert np.abs(outs["fp32"] - want).max() <= 1e-3
    # fp16 keeps 11 significant bits (relative step 2^-11 ≈ 4.9e-4) per weight and
    # activation; through a dozen layers errors add up to well under 1% of the logits' scale.
    assert np.abs(outs["fp16"] - want).max() <= 1e-2 * np.abs(want).max()
    # int8 on the images it was calibrated with: 20 dB is test_quant's floor for PTQ.
    assert snr_db(want, outs["int8"]) >= 20
    assert result.max_diff["fp32"] <= 1e-3 and result.snr_db["int8"] >= 20


def test_int8_follows_tensorrt_qdq_rules(tiny) -> None:
    _, result = tiny
    graph = onnx.load(str(result.files["int8"])).graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:  # signed int8, symmetric: every zero point is an int8 zero
        zero = inits[node.input[2]]
        assert zero.data_type == onnx.TensorProto.INT8
        assert not numpy_helper.to_array(zero).any()
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 12  # stem, 4 blocks of 2, 3 downsample shortcuts
    for conv in convs:  # int8 weights, one scale per output channel, on axis 0
        dq = producers[conv.input[1]]
        weight = numpy_helper.to_array(inits[dq.input[0]])
        scale = numpy_helper.to_array(inits[dq.input[1]])
        assert dq.op_type == "DequantizeLinear" and weight.dtype == np.int8
        assert scale.shape == (weight.shape[0],)
        assert {a.name: a.i for a in dq.attribute}.get("axis") == 0
        assert len(conv.input) < 3 or conv.input[2] in inits  # bias stays float
        assert producers[conv.input[0]].op_type == "DequantizeLinear"  # input quantized
    # Residual adds: the main branch enters straight from its conv (TensorRT fuses them),
    # the shortcut through Q/DQ; with a downsample conv, that conv is the quantized one.
    adds = [n for n in graph.node if n.op_type == "Add"]
    assert len(adds) == 4
    for add in adds:
        kinds = [producers[i].op_type for i in add.input]
        assert kinds == ["Conv", "DequantizeLinear"], add.name
        assert "conv2" in producers[add.input[0]].name
    assert {o.domain for o in onnx.load(str(result.files["int8"])).opset_import} <= {""}
    assert tensorrt_problems(result.files["int8"]) == []


def test_checker_passes_our_forms_and_names_real_violations(tiny, tmp_path) -> None:
    _, result = tiny
    for path in result.files.values():
        assert tensorrt_problems(path) == []
    # netshrink's own CPU PTQ: uint8 asymmetric activations and int32 biases. TensorRT
    # takes none of that, and the checker says so, naming the fix.
    cpu = quantize_onnx(result.files["fp32"], tmp_path / "cpu.onnx", calib(1), PTQConfig())
    problems = tensorrt_problems(cpu)
    text = "\n".join(problems)
    assert "uint8 tensor; TensorRT's Q/DQ take signed int8 only" in text
    assert "non-zero zero point" in text
    assert "int32 tensor" in text and "leave biases in float" in text
    # ONNX Runtime's operator format is refused outright.
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from netshrink.export.calibration_reader import CalibrationReader

    qop = tmp_path / "qop.onnx"
    quantize_static(str(result.files["fp32"]), str(qop), CalibrationReader(calib(1)),
                    quant_format=QuantFormat.QOperator, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    assert any("QLinearConv" in p and "not supported" in p for p in tensorrt_problems(qop))


def _tiny_graph(tmp_path: Path, *, weight: np.ndarray, axis: int, opset: int = 17,
                batch: str | int = "batch", fp16: np.ndarray | None = None) -> Path:
    """One conv with an int8 per-channel weight DequantizeLinear, built by hand."""
    out_ch = weight.shape[0]
    inits = [numpy_helper.from_array(weight, "w_q"),
             numpy_helper.from_array(np.full(weight.shape[axis], 0.1, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(weight.shape[axis], np.int8), "w_z")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=axis,
                              name="w_dq"),
             helper.make_node("Conv", ["input", "w"], ["logits"], name="conv")]
    if fp16 is not None:
        inits.append(numpy_helper.from_array(fp16, "h"))
        nodes.append(helper.make_node("Identity", ["h"], ["h_out"], name="h_id"))
    dim = [batch, weight.shape[1], 4, 4]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, dim)],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT,
                                       [batch, out_ch, 4 - weight.shape[2] + 1,
                                        4 - weight.shape[3] + 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / f"tiny-{axis}-{opset}-{batch}.onnx"
    onnx.save(model, str(path))
    return path


def test_checker_axis_opset_batch_and_fp16_rules(tmp_path) -> None:
    weight = np.ones((4, 2, 3, 3), np.int8)  # 4 output channels on axis 0
    assert tensorrt_problems(_tiny_graph(tmp_path, weight=weight, axis=0)) == []
    wrong = tensorrt_problems(_tiny_graph(tmp_path, weight=weight, axis=1))
    assert any("axis 1" in p and "output channels on axis 0" in p for p in wrong)
    old = tensorrt_problems(_tiny_graph(tmp_path, weight=weight, axis=0, opset=11))
    assert any("need opset 13" in p for p in old)
    fixed = tensorrt_problems(_tiny_graph(tmp_path, weight=weight, axis=0, batch=1))
    assert any("batch dimension is 1, not dynamic" in p for p in fixed)
    inf = np.array([1.0, np.inf], np.float16)
    bad16 = tensorrt_problems(_tiny_graph(tmp_path, weight=weight, axis=0, fp16=inf))
    assert any("fp16 initializer 'h' holds inf" in p for p in bad16)
    with pytest.raises(UserError, match="not an ONNX file"):
        (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf\xff" * 9)
        tensorrt_problems(tmp_path / "junk.onnx")


def test_fp16_clamps_weights_beyond_its_range(tmp_path) -> None:
    from netshrink.export.onnx import export_onnx

    model = randomized_model(ModelSpec(arch="resnet_tiny", num_classes=10, stem="cifar"))
    with torch.no_grad():
        model.fc.bias[0] = 1e6  # far beyond fp16's 65504: a plain cast would give inf
    fp32 = export_onnx(model, tmp_path / "f.onnx", input_shape=SHAPE)
    assert convert_fp16(fp32, tmp_path / "h.onnx") == 1
    graph = onnx.load(str(tmp_path / "h.onnx")).graph
    halves = [numpy_helper.to_array(i) for i in graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT16]
    assert halves and all(np.isfinite(h).all() for h in halves)
    assert max(float(np.abs(h).max()) for h in halves) == 65504.0
    assert tensorrt_problems(tmp_path / "h.onnx") == []


def test_trtexec_commands_and_script(tiny) -> None:
    _, result = tiny
    script = result.script.read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and 'cd "$(dirname "$0")"' in script
    assert result.script.stat().st_mode & 0o111
    for form in ("fp32", "fp16", "int8"):
        cmd = result.commands[form]
        assert cmd.build in script and cmd.time in script
        build = shlex.split(cmd.build)
        assert build[:3] == ["trtexec", f"--onnx=model.{form}.onnx",
                             f"--saveEngine=model.{form}.plan"]
        assert "--minShapes=input:1x3x32x32" in build
        assert "--optShapes=input:4x3x32x32" in build
        assert "--maxShapes=input:16x3x32x32" in build
        # TensorRT 10: precision comes from the file (strongly typed), no --fp16/--int8.
        assert ("--stronglyTyped" in build) == (form != "fp32")
        assert not {"--fp16", "--int8", "--best"} & set(build)
        assert shlex.split(cmd.time) == ["trtexec", f"--loadEngine=model.{form}.plan",
                                         "--shapes=input:4x3x32x32", "--useCudaGraph",
                                         "--noDataTransfers"]
    r224 = trtexec_commands(["int8"], [3, 224, 224])["int8"]
    assert r224.build == ("trtexec --onnx=model.int8.onnx --saveEngine=model.int8.plan "
                          "--minShapes=input:1x3x224x224 --optShapes=input:8x3x224x224 "
                          "--maxShapes=input:32x3x224x224 --stronglyTyped --skipInference")
    with pytest.raises(UserError, match="opt_batch 64 must be between 1 and max_batch 32"):
        trtexec_commands(["fp32"], SHAPE, opt_batch=64)
    with pytest.raises(UserError, match=r"choose one or more of fp32, fp16, int8 \(unknown: "
                                        r"int4\)"):
        trtexec_commands(["int4"], SHAPE)


def test_int8_needs_calibration_and_a_float_input(tiny, tmp_path) -> None:
    model, result = tiny
    with pytest.raises(UserError, match="the int8 form needs calibration images"):
        export_tensorrt(model, tmp_path / "x", input_shape=SHAPE, forms=["int8"])
    with pytest.raises(UserError, match="already quantized"):
        quantize_int8(result.files["int8"], tmp_path / "twice.onnx", calib(1))
    assert not (tmp_path / "twice.onnx").exists()


def test_stage_in_a_recipe_writes_forms_notes_and_commands(fashion_dir, tmp_path) -> None:
    raw = {
        "name": "trt",
        "model": {"arch": "resnet_tiny"},
        "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 0,
                 "calib_size": 32},
        "measure": {"latency": False, "batch_size": 50},
        "stages": [
            {"kind": "train", "epochs": 1, "lr": 0.05, "batch_size": 32},
            {"kind": "export.tensorrt", "name": "trt", "opt_batch": 4, "max_batch": 16},
            {"kind": "export.tensorrt", "name": "trt-fp16", "forms": ["fp32", "fp16"],
             "measure": "fp16"},
        ],
    }
    record = run_recipe(parse_recipe(raw), tmp_path, log=lambda _: None, report=True)
    by_name = {s.name: s for s in record.stages}
    trt, half = by_name["trt"], by_name["trt-fp16"]
    assert (trt.measurement.runtime, trt.measurement.precision) == ("onnxruntime", "int8")
    assert (half.measurement.runtime, half.measurement.precision) == ("onnxruntime", "fp16")
    assert set(trt.measurement.sizes) == {"fp32_onnx", "fp16_onnx", "int8_onnx"}
    assert set(half.measurement.sizes) == {"fp32_onnx", "fp16_onnx"}
    float_top1 = by_name["train"].measurement.accuracy.top1
    assert trt.measurement.accuracy.top1 >= float_top1 - 0.05
    assert half.measurement.accuracy.top1 == pytest.approx(float_top1, abs=0.01)
    folder = tmp_path / "stages" / "02-trt"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "model.fp16.onnx", "model.fp32.onnx", "model.int8.onnx", "trtexec.sh"]
    assert not (tmp_path / "stages" / "03-trt-fp16" / "model.int8.onnx").exists()
    script = (folder / "trtexec.sh").read_text()
    notes = "\n".join(trt.notes)
    report = (tmp_path / "report.md").read_text()
    for form in ("fp32", "fp16", "int8"):
        build = next(line for line in script.splitlines()
                     if line.startswith(f"trtexec --onnx=model.{form}.onnx"))
        assert "--optShapes=input:4x1x28x28" in build
        assert build in notes
        assert f"{form} (model.{form}.onnx): passes onnx.checker and the static TensorRT " \
            "checks" in notes
        assert build in report  # the report's stage notes carry the exact command


def test_bad_stage_configs_fail_clearly() -> None:
    with pytest.raises(UserError, match=r"'fp32', 'fp16' or 'int8'"):
        parse_recipe({"stages": [{"kind": "export.tensorrt", "forms": ["fp32", "int4"]}]})
    with pytest.raises(UserError, match=r"measure 'int8' is not among forms \['fp32', "
                                        r"'fp16'\]; add it to forms"):
        parse_recipe({"stages": [{"kind": "export.tensorrt", "forms": ["fp32", "fp16"]}]})
    with pytest.raises(UserError, match="opt_batch 64 is above max_batch 32"):
        parse_recipe({"stages": [{"kind": "export.tensorrt", "opt_batch": 64}]})
    with pytest.raises(UserError, match="lists a form twice"):
        parse_recipe({"stages": [{"kind": "export.tensorrt", "forms": ["int8", "int8"]}]})
    with pytest.raises(UserError, match=r"unknown key 'precision'; allowed: forms, measure"):
        parse_recipe({"stages": [{"kind": "export.tensorrt", "precision": "fp16"}]})


def test_tensorrt_runtime_refuses_without_a_gpu(tiny, fashion_dir, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without a GPU")
    from netshrink.runtime import ModelStats, open_runtime

    _, result = tiny
    with pytest.raises(UserError, match="NVIDIA GPU"):
        open_runtime(result.files["fp32"], "tensorrt", stats=ModelStats(1, 1, None),
                     device="cpu", input_shape=SHAPE)
    raw = {"name": "t", "model": {"arch": "resnet_tiny"},
           "data": {"name": "fashion_mnist", "root": str(fashion_dir), "calib_size": 32},
           "stages": [{"kind": "export.tensorrt", "runtime": "tensorrt"}]}
    with pytest.raises(UserError, match="NVIDIA GPU"):
        run_recipe(parse_recipe(raw), tmp_path, log=lambda _: None, report=False)
    assert not list((tmp_path / "stages").glob("01-*/*.onnx"))  # refused before writing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_matches_torch(tiny, form: str) -> None:
    pytest.importorskip("tensorrt")
    from netshrink.runtime import ModelStats, open_runtime

    model, result = tiny
    engine = open_runtime(result.files[form], "tensorrt", stats=ModelStats(1, 1, None),
                          precision=form, device="cuda", input_shape=SHAPE)
    x = torch.from_numpy(calib(1, 8)[0])
    with torch.inference_mode():
        want = model(x).numpy()
        got = engine(x.cuda()).cpu().numpy()
    assert snr_db(want, got) >= {"fp32": 60, "fp16": 40, "int8": 20}[form]
    assert list(result.files[form].parent.glob(f"model.{form}.*.plan"))  # engine kept
