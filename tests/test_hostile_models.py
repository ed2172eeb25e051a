"""Hostile model files: what a file can make netshrink allocate or run.

Each file here passes every bound a reader checks on its own (sizes, JSON, shapes, class
counts) and still asked, before issue 23, for gigabytes: an image size that a tiny
ResNet turns into 17 GB of activations at evaluation's batch, channel-pruned widths
carried as 1-byte tensors, an ONNX or OpenVINO input of 60,000 pixels a side, a trusted
factory's arguments chosen by the file. Every case must end as the readers' cases do:
exit 2 (or ``UserError`` from the Python API), one line naming the problem and the way
out, no traceback, nothing written. The fuzzing at the end mutates the same facts
(spec and meta, pruned widths, factory arguments, ONNX input shapes): only
``UserError`` may escape.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save as st_save

import netshrink
from custom_models import make_tiny
from netshrink.api.custom import save_custom
from netshrink.bench import MeasureOptions
from netshrink.cli import main
from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model
from netshrink.models.footprint import DEFAULT_MAX_ACTIVATION_BYTES, meta_forward
from netshrink.runtime.files import open_model_file
from netshrink.store.checkpoint import FORMAT
from test_hostile_readers import (
    GRAY,
    check_case,
    gray_meta,
    model_file,
    small_png,
    with_meta_key,
    with_spec_key,
)

Run = list[str] | Callable[[], Any]
FACTORY = "custom_models:make_tiny"
QUICK = MeasureOptions(warmup=0, latency_runs=1, throughput_warmup=0, throughput_runs=1,
                       min_seconds=None, noisy_retries=0, memory=False)

# ------------------------------------------------------------------------ crafted files


def tiny_onnx(dims: list[Any], *, classes: int = 10, elem: int = TensorProto.FLOAT,
              nodes: list[Any] | None = None, inits: list[Any] | None = None) -> bytes:
    """An ONNX graph from elsewhere (no netshrink metadata): ``x[dims]`` -> global average
    pool -> flatten -> matmul -> ``y[N, classes]``, or ``nodes`` of the caller's."""
    channels = dims[1] if len(dims) > 1 and isinstance(dims[1], int) and 0 < dims[1] <= 64 \
        else 1  # the weights of an absurd channel count would be the test's own allocation
    x = helper.make_tensor_value_info("x", elem, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], classes])
    if nodes is None:
        nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
                 helper.make_node("Flatten", ["p"], ["f"]),
                 helper.make_node("MatMul", ["f", "w"], ["y"])]
        inits = [numpy_helper.from_array(np.ones((channels, classes), np.float32), "w")]
    graph = helper.make_graph(nodes, "g", [x], [y], inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def onnx_file(tmp: Path, dims: list[Any], name: str = "m.onnx", **kw: Any) -> Path:
    path = tmp / name
    path.write_bytes(tiny_onnx(dims, **kw))
    return path


@functools.cache
def _ir_parts() -> tuple[str, bytes]:
    """A small OpenVINO IR of ``tiny_onnx(["N", 1, 8, 8])``: its XML text and weights."""
    import tempfile

    import openvino as ov

    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "m.onnx"
        src.write_bytes(tiny_onnx(["N", 1, 8, 8]))
        ov.save_model(ov.convert_model(str(src)), str(Path(folder) / "m.xml"))
        return (Path(folder) / "m.xml").read_text(), (Path(folder) / "m.bin").read_bytes()


def ir_file(tmp: Path, side: int) -> Path:
    """The IR with its input edited to ``side`` pixels a side (the XML only)."""
    xml, weights = _ir_parts()
    edited = xml.replace('shape="?,1,8,8"', f'shape="?,1,{side},{side}"')
    assert edited != xml
    (tmp / "m.xml").write_text(edited)
    (tmp / "m.bin").write_bytes(weights)
    return tmp / "m.xml"


PRUNED = GRAY.model_copy(update={"pruned": True})


def pruned_file(path: Path, shapes: dict[str, list[int]], *, image_size: int = 28,
                dtype: torch.dtype = torch.uint8) -> Path:
    """A netshrink model file of a channel-pruned tiny ResNet whose tensors ``shapes``
    replace the architecture's own (as 1-byte tensors: 4 times smaller than floats)."""
    state = {k: v.clone() for k, v in build_model(PRUNED).state_dict().items()}
    for key, shape in shapes.items():
        state[key] = torch.ones(shape, dtype=dtype)
    meta = {**gray_meta("fashion_mnist", image_size)}
    header = {"format": FORMAT, "spec": PRUNED.model_dump_json(), "meta": json.dumps(meta)}
    path.write_bytes(st_save({k: v.contiguous() for k, v in state.items()}, metadata=header))
    return path


def widened(width: int) -> dict[str, list[int]]:
    """Shapes that make the stem and the first stage ``width`` channels wide, with
    1-channel bottlenecks around them so the file stays small."""
    shapes = {"conv1.weight": [width, 1, 3, 3], "layer1.0.conv1.weight": [1, width, 3, 3],
              "layer1.0.conv2.weight": [width, 1, 3, 3], "layer2.0.conv1.weight": [1, width, 3, 3],
              "layer2.0.conv2.weight": [16, 1, 3, 3],
              "layer2.0.downsample.0.weight": [16, width, 1, 1]}
    for norm, w in (("bn1", width), ("layer1.0.bn1", 1), ("layer1.0.bn2", width),
                    ("layer2.0.bn1", 1)):
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{norm}.{part}"] = [w]
    return shapes


def custom_file(tmp: Path, kwargs: Any, meta: dict | None = None) -> Path:
    """A custom model file (``make_tiny(width=8)``'s weights) whose ``factory_kwargs``
    the file sets to ``kwargs``."""
    path = tmp / "custom.safetensors"
    torch.manual_seed(0)
    save_custom(make_tiny(8), path, factory=FACTORY, factory_kwargs={"width": 8},
                meta=meta if meta is not None else {"image_size": 8, "in_channels": 1})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    spec = json.loads(header["__metadata__"]["spec"])
    header["__metadata__"]["spec"] = json.dumps({**spec, "factory_kwargs": kwargs})
    body = json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + data[8 + n :])
    return path


def recipe(tmp: Path, *, top: dict | None = None, stage: dict | None = None,
           data: dict | None = None) -> list[str]:
    raw = {"name": "tiny", "model": {"arch": "resnet_tiny"},
           "data": {"name": "fashion_mnist", "root": str(tmp / "no-data"), **(data or {})},
           "stages": [{"kind": "train", "epochs": 1, "max_steps": 1, **(stage or {})}],
           **(top or {})}
    path = tmp / "r.yaml"
    path.write_text(json.dumps(raw))
    return ["run", str(path), "--out", str(tmp / "out")]


# ------------------------------------------------------------------------ the cases
# 1. Sizes that pass every bound and still blow up.


def st_image_size_bench(tmp: Path) -> Run:
    f = with_meta_key(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      image_size=4096)
    return ["bench", "--weights", str(f), "--repeats", "1"]


def st_image_size_eval(tmp: Path) -> Run:
    f = with_meta_key(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      image_size=4096)
    return ["eval", "--weights", str(f), "--data", "digits"]


def st_image_size_predict(tmp: Path) -> Run:
    f = with_meta_key(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      image_size=4096)
    image = str(small_png(tmp / "x.png"))
    return ["predict", "--weights", str(f), image, image, image, image]


def st_image_size_api_measure(tmp: Path) -> Run:
    f = with_meta_key(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      image_size=4096)
    return lambda: netshrink.measure(f, options=QUICK)


def st_pruned_wide(tmp: Path) -> Run:
    f = pruned_file(tmp / "m.safetensors", widened(20_000), image_size=64)
    return ["bench", "--weights", str(f), "--repeats", "1"]


def st_pruned_wide_eval(tmp: Path) -> Run:
    f = pruned_file(tmp / "m.safetensors", widened(20_000), image_size=64)
    return ["eval", "--weights", str(f), "--data", "digits"]


def st_pruned_not_chaining(tmp: Path) -> Run:
    f = pruned_file(tmp / "m.safetensors", {"conv1.weight": [5, 1, 3, 3]}, dtype=torch.float32)
    return ["eval", "--weights", str(f), "--data", "digits"]


def st_pruned_zero_width(tmp: Path) -> Run:
    shapes = {"conv1.weight": [0, 1, 3, 3], **{f"bn1.{p}": [0] for p in
                                               ("weight", "bias", "running_mean",
                                                "running_var")}}
    f = pruned_file(tmp / "m.safetensors", shapes, dtype=torch.float32)
    return ["bench", "--weights", str(f), "--repeats", "1"]


def st_spec_resnet101_on_tiny_weights(tmp: Path) -> Run:
    f = with_spec_key(model_file(tmp / "ok.safetensors"), tmp / "m.safetensors",
                      arch="resnet101")
    return ["bench", "--weights", str(f), "--repeats", "1"]


def bench_arch_huge_input(tmp: Path) -> Run:
    return ["bench", "--arch", "resnet_tiny", "--input", "3x100000x100000", "--repeats", "1"]


def bench_activation_bound_not_a_number(tmp: Path) -> Run:
    os.environ["NETSHRINK_MAX_ACTIVATION_BYTES"] = "lots"  # the test restores it
    return ["bench", "--weights", str(model_file(tmp / "m.safetensors")), "--repeats", "1"]


# 2. Input shapes of a foreign ONNX or IR.


def onnx_huge_bench(tmp: Path) -> Run:
    return ["bench", "--weights", str(onnx_file(tmp, ["N", 1, 60_000, 60_000])),
            "--repeats", "1"]


def onnx_huge_eval(tmp: Path) -> Run:
    return ["eval", "--weights", str(onnx_file(tmp, ["N", 1, 60_000, 60_000])),
            "--data", "digits"]


def onnx_huge_at_eval_batch(tmp: Path) -> Run:
    # One image is within the bound (1.6 GB); evaluation's batch of 256 is not.
    return ["eval", "--weights", str(onnx_file(tmp, ["N", 1, 20_000, 20_000])),
            "--data", "digits"]


def onnx_huge_api_measure(tmp: Path) -> Run:
    f = onnx_file(tmp, ["N", 1, 20_000, 20_000])
    return lambda: netshrink.measure(f, options=QUICK)


def onnx_huge_intermediate(tmp: Path) -> Run:
    # A small input, and a node that makes a 40 GB tensor of it.
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["big"]),
             helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["y0"]),
             helper.make_node("ReduceSum", ["big"], ["z"], keepdims=0),
             helper.make_node("Add", ["y0", "z"], ["y"])]
    inits = [numpy_helper.from_array(np.array([100_000, 100_000], np.int64), "s"),
             numpy_helper.from_array(np.ones((1, 10), np.float32), "w")]
    f = onnx_file(tmp, ["N", 1, 8, 8], nodes=nodes, inits=inits)
    return ["bench", "--weights", str(f), "--repeats", "1"]


def onnx_empty_dim(tmp: Path) -> Run:
    return ["bench", "--weights", str(onnx_file(tmp, ["N", 1, 0, 8])), "--repeats", "1"]


def ir_huge_bench(tmp: Path) -> Run:
    return ["bench", "--weights", str(ir_file(tmp, 40_000)), "--repeats", "1"]


def ir_huge_eval(tmp: Path) -> Run:
    return ["eval", "--weights", str(ir_file(tmp, 40_000)), "--data", "digits"]


# 3. predict with a foreign ONNX of an odd input size.


def predict_onnx(dims: list[Any]) -> Callable[[Path], Run]:
    def build(tmp: Path) -> Run:
        return ["predict", "--weights", str(onnx_file(tmp, dims)), "--data", "digits",
                str(small_png(tmp / "x.png"))]
    return build


# 4. The Python API on a foreign ONNX that loads but cannot run.


def api_measure_int64_input(tmp: Path) -> Run:
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["y"])]
    inits = [numpy_helper.from_array(np.ones((1, 10), np.float32), "w")]
    f = onnx_file(tmp, ["N", 1, 8, 8], elem=TensorProto.INT64, nodes=nodes, inits=inits)
    return lambda: netshrink.measure(f, options=QUICK)


def _bad_reshape(tmp: Path) -> Path:
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"])]
    inits = [numpy_helper.from_array(np.array([7, 10], np.int64), "s")]
    return onnx_file(tmp, ["N", 1, 8, 8], nodes=nodes, inits=inits)


def api_measure_bad_reshape(tmp: Path) -> Run:
    f = _bad_reshape(tmp)
    return lambda: netshrink.measure(f, options=QUICK)


def eval_bad_reshape(tmp: Path) -> Run:
    return ["eval", "--weights", str(_bad_reshape(tmp)), "--data", "digits"]


def api_measure_fixed_batch(tmp: Path) -> Run:
    f = onnx_file(tmp, [2, 1, 8, 8])
    return lambda: netshrink.measure(f, options=QUICK)


def api_load_onnx_not_a_graph_ort_takes(tmp: Path) -> Run:
    # Parses as ONNX, with a node of an operator no runtime has.
    nodes = [helper.make_node("NoSuchOperator", ["x"], ["y"])]
    f = onnx_file(tmp, ["N", 1, 8, 8], nodes=nodes, inits=[])
    return lambda: netshrink.load(f)


# 5. A trusted factory's arguments, chosen by the file.


def custom_kwargs(kwargs: Any, meta: dict | None = None) -> Callable[[Path], Run]:
    def build(tmp: Path) -> Run:
        f = custom_file(tmp, kwargs, meta)
        return lambda: netshrink.load(f, trust=[FACTORY])
    return build


# 6. Absurd class counts and seeds.


def num_classes(value: str) -> Callable[[Path], Run]:
    return lambda tmp: ["bench", "--arch", "resnet_tiny", "--num-classes", value]


def eval_split_seed_beyond_int64(tmp: Path) -> Run:
    meta = {**gray_meta("digits"), "split": {"val_size": 10, "seed": 10**20}}
    f = model_file(tmp / "m.safetensors", meta=meta)
    return ["eval", "--weights", str(f), "--split", "val"]


BIG_SEED = 99999999999999999999
CASES = [
    pytest.param(st_image_size_bench, "at batch 32", id="safetensors-image-size-4096-bench"),
    pytest.param(st_image_size_eval, "at batch 256", id="safetensors-image-size-4096-eval"),
    pytest.param(st_image_size_predict, "at batch 4", id="safetensors-image-size-4096-predict"),
    pytest.param(st_image_size_api_measure, "NETSHRINK_MAX_ACTIVATION_BYTES",
                 id="safetensors-image-size-4096-api-measure"),
    pytest.param(st_pruned_wide, "bytes of activations", id="safetensors-pruned-20000-wide-bench"),
    pytest.param(st_pruned_wide_eval, "at batch 256", id="safetensors-pruned-20000-wide-eval"),
    pytest.param(st_pruned_not_chaining, "do not fit together",
                 id="safetensors-pruned-widths-do-not-chain"),
    pytest.param(st_pruned_zero_width, "does not fit", id="safetensors-pruned-zero-width"),
    pytest.param(st_spec_resnet101_on_tiny_weights, "does not fit",
                 id="safetensors-spec-resnet101-tiny-weights"),
    pytest.param(bench_arch_huge_input, "NETSHRINK_MAX_ACTIVATION_BYTES",
                 id="bench-arch-input-100000px"),
    pytest.param(bench_activation_bound_not_a_number, "NETSHRINK_MAX_ACTIVATION_BYTES='lots'",
                 id="bench-activation-bound-not-a-number"),
    pytest.param(onnx_huge_bench, "14,400,000,0", id="onnx-input-60000px-bench"),
    pytest.param(onnx_huge_eval, "14,400,000,0", id="onnx-input-60000px-eval"),
    pytest.param(onnx_huge_at_eval_batch, "at batch 256", id="onnx-input-20000px-eval-batch"),
    pytest.param(onnx_huge_api_measure, "at batch 32", id="onnx-input-20000px-api-measure"),
    pytest.param(onnx_huge_intermediate, "40,000,000,",
                 id="onnx-constantofshape-40GB-intermediate"),
    pytest.param(onnx_empty_dim, "empty dimension", id="onnx-input-empty-dim-bench"),
    pytest.param(ir_huge_bench, "6,400,000,0", id="ir-input-40000px-bench"),
    pytest.param(ir_huge_eval, "6,400,000,0", id="ir-input-40000px-eval"),
    pytest.param(predict_onnx(["N", 1, 8, 12]), "square", id="predict-onnx-non-square"),
    pytest.param(predict_onnx(["N", 1, 0, 8]), "empty dimension", id="predict-onnx-empty-dim"),
    pytest.param(predict_onnx(["N", 3, 8, 8]), "3-channel", id="predict-onnx-wrong-channels"),
    pytest.param(predict_onnx(["N", 1, 16, 16]), "16x16", id="predict-onnx-other-size"),
    pytest.param(predict_onnx(["N", 1, 60_000, 60_000]), "NETSHRINK_MAX_ACTIVATION_BYTES",
                 id="predict-onnx-60000px"),
    pytest.param(api_measure_int64_input, "ONNX Runtime cannot run it",
                 id="api-measure-onnx-int64-input"),
    pytest.param(api_measure_bad_reshape, "ONNX Runtime cannot run it",
                 id="api-measure-onnx-reshape-fails-at-run"),
    pytest.param(eval_bad_reshape, "ONNX Runtime cannot run it",
                 id="eval-onnx-reshape-fails-at-run"),
    pytest.param(api_measure_fixed_batch, "Expected: 2", id="api-measure-onnx-fixed-batch-2"),
    pytest.param(api_load_onnx_not_a_graph_ort_takes, "ONNX Runtime cannot load it",
                 id="api-load-onnx-unknown-operator"),
    pytest.param(custom_kwargs({"width": 20_000}), "would build a model of",
                 id="api-load-custom-kwargs-width-20000"),
    pytest.param(custom_kwargs({"width": 10**9}), "a file may set",
                 id="api-load-custom-kwargs-width-1e9"),
    pytest.param(custom_kwargs({"widht": 8}), "TypeError", id="api-load-custom-kwargs-typo"),
    pytest.param(custom_kwargs({"width": -3}), "negative dimension",
                 id="api-load-custom-kwargs-negative"),
    pytest.param(custom_kwargs({"width": {"nested": [1]}}), "a file may set",
                 id="api-load-custom-kwargs-nested"),
    pytest.param(custom_kwargs({f"a{i}": 1 for i in range(40)}), "more than the 32",
                 id="api-load-custom-kwargs-40-names"),
    pytest.param(custom_kwargs([8]), "factory_kwargs: Input should be a valid dictionary",
                 id="api-load-custom-kwargs-a-list"),
    pytest.param(custom_kwargs({"width": 8}, {"image_size": 10**9}), "image_size",
                 id="api-load-custom-meta-image-size-1e9"),
    pytest.param(num_classes("1000000000"), "--num-classes 1000000000",
                 id="bench-num-classes-1e9"),
    pytest.param(num_classes("0"), "--num-classes 0", id="bench-num-classes-0"),
    pytest.param(num_classes("-5"), "--num-classes -5", id="bench-num-classes-negative"),
    pytest.param(lambda tmp: recipe(tmp, top={"seed": BIG_SEED}), "seed",
                 id="run-seed-beyond-int64"),
    pytest.param(lambda tmp: recipe(tmp, top={"seed": -1}), "seed", id="run-seed-negative"),
    pytest.param(lambda tmp: recipe(tmp, stage={"seed": BIG_SEED}), "seed",
                 id="run-stage-seed-beyond-int64"),
    pytest.param(lambda tmp: recipe(tmp, data={"seed": BIG_SEED}), "data.seed",
                 id="run-data-seed-beyond-int64"),
    pytest.param(eval_split_seed_beyond_int64, "no valid data split",
                 id="eval-split-seed-beyond-int64"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("case", "reason"), CASES)
def test_hostile_model_gives_one_line_error(case, reason, tmp_path, capsys,
                                            monkeypatch) -> None:
    monkeypatch.setenv("NETSHRINK_MAX_ACTIVATION_BYTES", "")  # the default; restored after
    # Image sizes up to 4096 let through (the default bound is 2048), so that a file of
    # that size shows the activation bound behind it: each fact within its own bound, the
    # activations they imply together still refused.
    monkeypatch.setenv("NETSHRINK_MAX_IMAGE_SIZE", "4096")
    check_case(case, reason, tmp_path, capsys, monkeypatch)


def test_the_table_covers_every_class() -> None:
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)) >= 40
    for kind in ("safetensors-image-size", "safetensors-pruned", "onnx-input", "ir-input",
                 "predict-onnx", "api-measure-onnx", "api-load-custom-kwargs",
                 "bench-num-classes", "run-seed", "run-stage-seed", "run-data-seed"):
        assert any(i.startswith(kind) for i in ids), kind


# ------------------------------------------------------------------- what still runs


def test_real_models_pass_the_activation_bound() -> None:
    """ResNet-101 at 224 px fits the default bound at evaluation's batch of 256 (on the
    meta device: nothing is allocated), and its peak is what the module docstring says."""
    with torch.device("meta"):
        model = build_model(ModelSpec(arch="resnet101"))
    per_image, macs = meta_forward(model, [3, 224, 224])
    assert per_image * 256 < DEFAULT_MAX_ACTIVATION_BYTES
    assert per_image == pytest.approx(11.8e6, rel=0.01) and macs == pytest.approx(7.8e9, rel=0.01)


def test_the_bound_is_the_variable_s(tmp_path, monkeypatch, capsys) -> None:
    weights = model_file(tmp_path / "m.safetensors")
    opened = open_model_file(weights)
    assert opened.activation_bytes is not None
    opened.check_batch(32)
    monkeypatch.setenv("NETSHRINK_MAX_ACTIVATION_BYTES", str(opened.activation_bytes * 31))
    with pytest.raises(UserError, match="raise NETSHRINK_MAX_ACTIVATION_BYTES"):
        opened.check_batch(32)
    opened.check_batch(31)


def test_odd_but_runnable_onnx_inputs_still_predict(tmp_path, capsys) -> None:
    """A free height and width take the dataset's size; a negative size is a free one
    (as ONNX Runtime reads it); a fixed square input of the data's size runs."""
    image = str(small_png(tmp_path / "x.png"))
    for i, dims in enumerate((["N", 1, "H", "W"], ["N", 1, -1, -1], ["N", 1, 8, 8])):
        f = onnx_file(tmp_path, dims, name=f"m{i}.onnx")
        assert main(["predict", "--weights", str(f), "--data", "digits", image]) == 0
    out = capsys.readouterr().out
    assert out.count("x.png:") == 3


def test_trusted_factory_with_the_callers_arguments(tmp_path) -> None:
    """The file's plain arguments load; the caller's, given with the trust, override a
    file's hostile ones (and are what the result keeps)."""
    plain = custom_file(tmp_path, {"width": 8})
    assert netshrink.load(plain, trust=[FACTORY]).factory_kwargs == {"width": 8}
    hostile = custom_file(tmp_path, {"width": 20_000})
    loaded = netshrink.load(hostile, trust={FACTORY: {"width": 8}})
    assert loaded.factory_kwargs == {"width": 8} and loaded.model.conv1.out_channels == 8
    with pytest.raises(UserError, match="trust"):
        netshrink.load(hostile, trust={"other:factory": {}})


def test_onnx_runtime_bugs_stay_visible(tmp_path) -> None:
    """Only ONNX Runtime's own exception types become a UserError: a plain RuntimeError
    (here ORT's binding refusing a string where a caller of ours must pass an array: a
    bug of ours, not the file's) still surfaces as itself."""
    opened = open_model_file(onnx_file(tmp_path, ["N", 1, 8, 8]))
    try:
        with pytest.raises(RuntimeError, match="numpy array") as exc:
            opened.module._run("not an array")  # type: ignore[arg-type]
        assert not isinstance(exc.value, UserError)
    finally:
        opened.close()


# ------------------------------------------------------------------------ fuzzing

FAST = int(os.environ.get("NETSHRINK_FUZZ_MODEL_EXAMPLES", "40"))
COUNTS: dict[str, dict[str, int]] = {}

big_int = st.one_of(st.integers(-3, 40), st.sampled_from([0, 1, 4096, 10**5, 2**31 - 1,
                                                          2**63 - 1, 10**20]),
                    st.integers(-(2**64), 2**64))
json_leaf = st.one_of(st.none(), st.booleans(), big_int, st.floats(allow_nan=False),
                      st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=3)
                          | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                          max_leaves=6)


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly ``strategy``, now and then any JSON value."""
    return st.sampled_from([False] * 7 + [True]).flatmap(
        lambda other: json_value if other else strategy)


# Mostly the file's own values (so that many cases load and reach the activation
# check), sometimes another valid value, sometimes any JSON value.
spec_dict = st.fixed_dictionaries({
    "arch": maybe(st.sampled_from(["resnet_tiny"] * 4 + ["resnet18", "resnet101"])),
    "num_classes": maybe(st.sampled_from([10] * 4 + [1, 10**5])),
    "in_channels": maybe(st.sampled_from([1] * 4 + [3, 64])),
    "stem": maybe(st.sampled_from(["cifar"] * 4 + ["imagenet"])),
}, optional={
    "pruned": maybe(st.booleans()),
    "blocks": maybe(st.one_of(st.just([1, 1, 1, 1]), st.lists(st.integers(-1, 3), max_size=5))),
})
meta_dict = st.fixed_dictionaries({}, optional={
    "image_size": maybe(st.one_of(st.integers(1, 64), st.sampled_from([4096, 2048, 0]))),
    "in_channels": maybe(st.sampled_from([1, 3])),
    "class_names": st.just([str(i) for i in range(10)]),
    "mean": st.just([0.3]), "std": st.just([0.3]),
})
# Pruned widths: each tensor of the stem and first stage resized, some absurdly.
width = st.one_of(st.integers(0, 12), st.sampled_from([1, 8, 5000, 40_000]))
# Either layers given another output width each (widths that seldom chain), or the
# stem and first stage widened consistently (a pruned file that loads, and may be huge).
width_edits = st.one_of(
    st.dictionaries(st.sampled_from(["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1",
                                     "layer1.0.conv2", "layer1.0.bn2", "fc"]),
                    width, max_size=4),
    st.builds(widened, st.one_of(st.integers(1, 12), st.sampled_from([5000, 40_000]))))


def _model_bytes(spec: dict, meta: dict, edits: dict[str, Any]) -> bytes:
    """A netshrink file of ``GRAY``'s tensors with ``spec`` and ``meta``, its ``edits``
    applied: a layer name to a new output width, or a tensor name to its new shape."""
    state = {k: v.clone() for k, v in build_model(GRAY).state_dict().items()}
    for name, edit in edits.items():
        if isinstance(edit, list):
            state[name] = torch.zeros(edit, dtype=torch.uint8)
            continue
        for key in [k for k in state if k.startswith(name + ".") and state[k].ndim >= 1]:
            state[key] = torch.zeros([edit, *state[key].shape[1:]], dtype=torch.uint8)
    header = {"format": FORMAT, "spec": json.dumps(spec), "meta": json.dumps(meta)}
    return st_save({k: v.contiguous() for k, v in state.items()}, metadata=header)


onnx_dim = st.one_of(st.integers(-2, 20), st.sampled_from([0, 1, 8, 60_000, 2**31, 2**62]),
                     st.sampled_from(["N", "H", "", "batch"]))
onnx_case = st.tuples(
    st.lists(onnx_dim, min_size=0, max_size=6),
    st.sampled_from([TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT64,
                     TensorProto.FLOAT16, TensorProto.UINT8]),
    st.integers(1, 12),
)


def fuzz(name: str, strategy: st.SearchStrategy, check: Callable[[Any], None],
         examples: int) -> None:
    """Run ``check`` on ``examples`` drawn inputs; only ``UserError`` may escape."""
    outcomes = COUNTS.setdefault(name, {"UserError": 0, "ran": 0})

    @settings(max_examples=examples, deadline=timedelta(seconds=10), database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(strategy)
    def run(value: Any) -> None:
        try:
            check(value)
        except UserError as exc:
            assert str(exc) and "\n" not in str(exc), str(exc)
            outcomes["UserError"] += 1
        else:
            outcomes["ran"] += 1

    run()
    print(f"fuzz {name}: {sum(outcomes.values())} cases, {outcomes['UserError']} UserError, "
          f"{outcomes['ran']} ran, 0 other exceptions")


def fuzzers(work: Path) -> dict[str, tuple[st.SearchStrategy, Callable[[Any], None]]]:
    def model_metadata(value: tuple[dict, dict, dict[str, Any]]) -> None:
        path = work / "m.safetensors"
        path.write_bytes(_model_bytes(*value))
        opened = open_model_file(path)
        try:
            opened.check_batch(256)
        finally:
            opened.close()

    def factory_kwargs(value: tuple[Any, Any]) -> None:
        kwargs, meta = value
        path = custom_file(work, kwargs, meta)
        netshrink.load(path, trust=[FACTORY])

    def onnx_inputs(value: tuple[list[Any], int, int]) -> None:
        dims, elem, classes = value
        path = work / "m.onnx"
        path.write_bytes(tiny_onnx(dims or ["N"], elem=elem, classes=classes))
        opened = open_model_file(path)
        try:
            opened.check_batch(32)
            if opened.input_shape is not None:
                opened.module(torch.zeros(1, *opened.input_shape))
        finally:
            opened.close()

    custom_meta = st.one_of(st.just({"image_size": 8, "in_channels": 1}),
                            st.fixed_dictionaries({}, optional={
                                "image_size": maybe(big_int), "in_channels": maybe(big_int)}))
    kwargs = st.one_of(st.fixed_dictionaries({"width": maybe(big_int)}),
                       st.dictionaries(st.text(max_size=6), json_value, max_size=4), json_value)
    return {
        "safetensors-spec-meta-widths": (st.tuples(spec_dict, meta_dict, width_edits),
                                         model_metadata),
        "custom-factory-kwargs": (st.tuples(kwargs, custom_meta), factory_kwargs),
        "onnx-input-shapes": (onnx_case, onnx_inputs),
    }


FUZZERS = ["safetensors-spec-meta-widths", "custom-factory-kwargs", "onnx-input-shapes"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", FUZZERS)
def test_fuzz_model_facts(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NETSHRINK_MAX_ACTIVATION_BYTES", raising=False)
    strategy, check = fuzzers(tmp_path)[name]
    fuzz(name, strategy, check, FAST)
