"""Static checks that an ONNX file is one TensorRT 10's ONNX parser accepts as we intend.

Only rules that NVIDIA documents and that can be read off the file are checked; each
message names the node or tensor, the rule and the fix. The sources:

* onnx-tensorrt's operator matrix (https://github.com/onnx/onnx-tensorrt/blob/main/docs/
  operators.md): TensorRT 10.0 parses opsets 9 to 20; ``QuantizeLinear``'s ``y_zero_point``
  must be 0; ``DequantizeLinear`` takes INT8 (or FP8/FP4/INT4) and its ``x_zero_point`` must
  be zero; ``ConvInteger``, ``MatMulInteger``, ``QLinearConv``, ``QLinearMatMul`` and
  ``DynamicQuantizeLinear`` are not supported; UINT8 only as a network input or output.
* TensorRT's Quantize/Dequantize operator pages (https://docs.nvidia.com/deeplearning/
  tensorrt/latest/_static/operators/Quantize.html, .../operators/docs/Dequantize.html): the
  scale is a build-time constant, a scalar (per tensor) or 1-D (per channel); the zero
  point has the scale's shape and only zeros.
* Per-channel weight scales on the output-channel axis (Conv weights are
  ``[Cout, Cin, kh, kw]``: axis 0; ConvTranspose: axis 1), as NVIDIA's Model Optimizer
  configures ONNX Runtime for TensorRT (github.com/NVIDIA/Model-Optimizer,
  modelopt/onnx/quantization/ort_utils.py), and per-axis Q/DQ needs opset 13 (ONNX
  QuantizeLinear-13 added ``axis``).

Loading a file never executes code: ONNX is a protobuf, read with ``onnx.load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from netshrink.errors import UserError

__all__ = ["FP16_MAX", "OPSET_RANGE", "UNSUPPORTED_OPS", "tensorrt_problems"]

# The opsets every TensorRT 10 release parses (10.0's operator matrix; later ones go higher).
OPSET_RANGE = (9, 20)
QDQ_MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear arrived in opset 13
FP16_MAX = 65504.0
# Operators ONNX Runtime's quantizers can emit that onnx-tensorrt marks unsupported.
UNSUPPORTED_OPS = frozenset({"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
                             "DynamicQuantizeLinear"})
_STANDARD_DOMAINS = ("", "ai.onnx")


def tensorrt_problems(path: Path) -> list[str]:
    """Every statically checkable reason TensorRT would reject ``path`` or misread it.

    Checks the opset, operators (unsupported ones and non-standard domains), every
    QuantizeLinear/DequantizeLinear (signed int8, zero points 0, constant scales,
    per-channel weights on the output-channel axis), fp16 initializers (finite, within
    fp16 range) and a named, dynamic batch dimension on every input and output.

    Returns:
        One line per problem; empty when the file passes.

    Raises:
        UserError: the file is missing or not an ONNX model.
    """
    import onnx

    if not path.is_file():
        raise UserError(f"{path}: file not found; export the model first")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError and others for a bad file
        raise UserError(f"{path}: not an ONNX file ({str(exc).splitlines()[0]}); give an "
                        ".onnx file written by netshrink or torch.onnx.export") from None
    graph = model.graph
    consts = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
    return [
        *_opset_problems(model, has_qdq),
        *_op_problems(graph),
        *_qdq_problems(graph, consts, producers, consumers),
        *_fp16_problems(graph, consts),
        *_batch_problems(graph),
    ]


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """Values known when the engine is built: initializers and Constant nodes."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _opset_problems(model: Any, has_qdq: bool) -> list[str]:
    version = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 0)
    low, high = OPSET_RANGE
    problems = []
    if not low <= version <= high:
        problems.append(f"opset {version}: TensorRT 10 parses opsets {low} to {high}; "
                        f"export with an opset in that range (17 is netshrink's default)")
    if has_qdq and version < QDQ_MIN_OPSET:
        problems.append(f"opset {version}: per-channel QuantizeLinear/DequantizeLinear need "
                        f"opset {QDQ_MIN_OPSET} or later; export with opset 13+ before quantizing")
    return problems


def _op_problems(graph: Any) -> list[str]:
    problems = []
    for node in graph.node:
        if node.domain not in _STANDARD_DOMAINS:
            problems.append(f"{node.op_type} '{node.name}' (domain {node.domain}): TensorRT's "
                            "ONNX parser knows only standard ONNX operators; export without "
                            "ONNX Runtime's contrib operators")
        elif node.op_type in UNSUPPORTED_OPS:
            problems.append(f"{node.op_type} '{node.name}': not supported by TensorRT's ONNX "
                            "parser; quantize in QDQ format (QuantizeLinear/DequantizeLinear) "
                            "with static int8 activations")
    return problems


def _int8_type(dtype: int) -> bool:
    import onnx

    return dtype == onnx.TensorProto.INT8


def _quantized_type(node: Any, inits: dict[str, int]) -> int:
    """The element type a QuantizeLinear produces (its zero point's, else ONNX's uint8)."""
    import onnx

    if len(node.input) > 2 and node.input[2]:
        return inits.get(node.input[2], onnx.TensorProto.UNDEFINED)
    for attr in node.attribute:
        if attr.name == "output_dtype" and attr.i:
            return int(attr.i)
    return onnx.TensorProto.UINT8  # the ONNX default when no zero point is given


def _qdq_problems(graph: Any, consts: dict[str, np.ndarray], producers: dict[str, Any],
                  consumers: dict[str, list[Any]]) -> list[str]:
    import onnx

    inits = {init.name: init.data_type for init in graph.initializer}
    for node in graph.node:  # Constant nodes' types, for zero points given that way
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                inits[node.output[0]] = attr.t.data_type
    problems = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = f"{node.op_type} '{node.name}'"
        if node.op_type == "QuantizeLinear":
            dtype = _quantized_type(node, inits)
        elif node.input[0] in inits:
            dtype = inits[node.input[0]]
        else:
            source = producers.get(node.input[0])
            dtype = (_quantized_type(source, inits)
                     if source is not None and source.op_type == "QuantizeLinear"
                     else onnx.TensorProto.INT8)  # unknown source: judged where it is made
        if not _int8_type(dtype):
            name = onnx.TensorProto.DataType.Name(dtype)
            fix = ("leave biases in float (QuantizeBias off)" if name == "INT32"
                   else "quantize with signed int8 activations and weights")
            problems.append(f"{where}: {name.lower()} tensor; TensorRT's Q/DQ take signed int8 "
                            f"only; {fix}")
        problems += _scale_problems(node, where, consts)
        if node.op_type == "DequantizeLinear" and node.input[0] in consts:
            problems += _axis_problems(node, where, consts, consumers)
    return problems


def _scale_problems(node: Any, where: str, consts: dict[str, np.ndarray]) -> list[str]:
    scale = consts.get(node.input[1])
    if scale is None:
        return [f"{where}: its scale '{node.input[1]}' is computed at run time; TensorRT needs "
                "a constant scale (calibrate statically)"]
    problems = []
    if scale.ndim > 1:
        problems.append(f"{where}: scale of shape {list(scale.shape)}; TensorRT takes a scalar "
                        "(per tensor) or a 1-D scale (per channel)")
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        problems.append(f"{where}: scales must be positive and finite; re-calibrate")
    if len(node.input) > 2 and node.input[2]:
        zero = consts.get(node.input[2])
        if zero is None:
            problems.append(f"{where}: zero point computed at run time; TensorRT needs a "
                            "constant zero point of 0")
        else:
            if np.any(zero != 0):
                problems.append(f"{where}: non-zero zero point; TensorRT quantizes "
                                "symmetrically (zero point 0): use symmetric quantization")
            if zero.shape != scale.shape:
                problems.append(f"{where}: zero point of shape {list(zero.shape)} for a scale "
                                f"of shape {list(scale.shape)}; they must match")
    return problems


def _output_channel_axis(consumer: Any) -> int | None:
    """The weight axis holding output channels for the layer reading the weights."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if consumer.op_type == "MatMul":
        return 1
    return None


def _axis_problems(node: Any, where: str, consts: dict[str, np.ndarray],
                   consumers: dict[str, list[Any]]) -> list[str]:
    """A per-channel weight DequantizeLinear must scale the layer's output channels."""
    weight, scale = consts[node.input[0]], consts.get(node.input[1])
    if scale is None or scale.size <= 1:
        return []
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)  # ONNX default: 1
    axis = axis + weight.ndim if axis < 0 else axis
    problems = []
    for consumer in consumers.get(node.output[0], []):
        if len(consumer.input) < 2 or consumer.input[1] != node.output[0]:
            continue
        want = _output_channel_axis(consumer)
        if want is not None and axis != want:
            problems.append(f"{where}: per-channel weight scales on axis {axis}, but "
                            f"{consumer.op_type} '{consumer.name}' has its output channels on "
                            f"axis {want}; quantize weights per output channel")
    if 0 <= axis < weight.ndim and weight.shape[axis] != scale.size:
        problems.append(f"{where}: {scale.size} scales for {weight.shape[axis]} channels on "
                        f"axis {axis}")
    return problems


def _fp16_problems(graph: Any, consts: dict[str, np.ndarray]) -> list[str]:
    """fp16 weights must be finite: a float32 value beyond ±65504 cast naively becomes inf."""
    import onnx

    fp16 = {init.name for init in graph.initializer
            if init.data_type == onnx.TensorProto.FLOAT16}
    problems = []
    for name in sorted(fp16):
        value = consts[name]
        if not np.all(np.isfinite(value)):
            problems.append(f"fp16 initializer '{name}' holds inf or NaN (a value beyond "
                            f"±{FP16_MAX:.0f}); convert with clamping (netshrink's fp16 form "
                            "clamps) or keep that layer in fp32")
    return problems


def _batch_problems(graph: Any) -> list[str]:
    """The trtexec commands vary the batch: every input and output needs a named dim 0."""
    inits = {init.name for init in graph.initializer}
    problems = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            if value.name in inits:
                continue
            dims = value.type.tensor_type.shape.dim
            if not dims or not dims[0].dim_param:
                fixed = dims[0].dim_value if dims else "none"
                problems.append(f"{kind} '{value.name}': batch dimension is {fixed}, not "
                                "dynamic; export with a dynamic batch axis (dynamic_axes) so "
                                "trtexec's --minShapes/--optShapes/--maxShapes apply")
    return problems
