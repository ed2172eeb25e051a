"""QDQ INT8 for TensorRT's explicit quantization, made with ONNX Runtime's quantizer.

The rules and where they come from are in ``netshrink.export.tensorrt_check``; this module
makes files that pass them, placing Q/DQ where TensorRT fuses (Model Optimizer's residual
Add handling: github.com/NVIDIA/Model-Optimizer, modelopt/onnx/quantization/graph_utils.py).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

from netshrink.errors import UserError
from netshrink.store.atomic import atomic_write_bytes

__all__ = ["INT8_OPS", "quantize_int8"]

# The layers whose inputs are quantized: TensorRT's INT8 kernels are convolutions and
# matrix products; Add is listed so its residual input gets a Q/DQ (see _fuse_residuals).
INT8_OPS = ("Conv", "Gemm", "MatMul", "Add")


def quantize_int8(float_onnx: Path, out: Path, batches: Sequence[np.ndarray]) -> Path:
    """Quantize ``float_onnx`` into QDQ INT8 the way TensorRT's explicit quantization wants.

    ONNX Runtime's static quantizer, with min-max calibration on ``batches``, set up as
    NVIDIA's Model Optimizer sets it up for TensorRT (modelopt/onnx/quantization/
    ort_utils.py), each choice for a documented rule:

    * int8 activations and weights, both symmetric: TensorRT's Q/DQ take signed int8 with
      zero point 0 (onnx-tensorrt operators.md).
    * biases left in float: int32 is not among the types TensorRT's DequantizeLinear takes
      (INT8, FP8, FP4, INT4).
    * per-channel weights on the output-channel axis (Conv: axis 0), pre-quantized to
      int8: TensorRT accepts low-precision weights behind a DequantizeLinear, and the file
      is a quarter the size.
    * no Q/DQ on the outputs of Conv/Gemm/Add (Model Optimizer: "No output
      quantization"): a layer's INT8 output comes from the next layer's input Q, and a
      Q/DQ between a conv and the residual Add it feeds would keep them apart;
      ``_fuse_residuals`` removes the one ONNX Runtime puts on the Add's input from that
      conv and keeps the one on the residual (shortcut) input.
    * ReLUs kept as nodes (``QDQKeepRemovableActivations``): ONNX Runtime's documentation
      asks for it when a later compiler (here TensorRT) removes the Q/DQ nodes it fuses.

    Raises:
        UserError: no calibration data, or an input that is already quantized.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from netshrink.export.calibration_reader import CalibrationReader
    from netshrink.runtime.sessions import onnx_precision

    if not batches:
        raise UserError("the calibration set is empty; give at least one batch of images")
    if onnx_precision(float_onnx) != "fp32":
        raise UserError(f"{float_onnx}: already quantized; quantize the float model")
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "OpTypesToExcludeOutputQuantization": list(INT8_OPS),
        "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
        "QDQKeepRemovableActivations": True,
        "CalibStridedMinMax": 1,  # merge ranges batch by batch: bounded memory
    }
    # ONNX Runtime's calibrator prints progress to stdout; a recipe's log is ours.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, redirect_stdout(io.StringIO()):
        prepared, target = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(float_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(target), CalibrationReader(batches), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(INT8_OPS), per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, extra_options=extra,
        )
        model = _tidy(target)
    atomic_write_bytes(out, model.SerializeToString())
    return out


def _tidy(path: Path) -> Any:
    """The quantized model with residual Adds made fusible and leftovers removed."""
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel

    model = onnx.load(str(path))
    _fuse_residuals(model.graph)
    wrapped = ONNXModel(model)
    wrapped.remove_unused_constant()  # the scales and zero points of removed Q/DQ
    wrapped.topological_sort()
    # ONNX Runtime's optimizer declares every domain it knows (com.microsoft, ...); keep
    # the ones nodes use, so the file claims nothing TensorRT's parser does not know.
    used = {node.domain for node in model.graph.node} | {"", "ai.onnx"}
    kept = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def _fuse_residuals(graph: Any) -> int:
    """Bypass the Q/DQ between a convolution and the residual Add it alone feeds.

    TensorRT fuses ``conv -> Add(+ residual) -> ReLU`` into one INT8 convolution when the
    conv output enters the Add unquantized and the other (residual) input comes through a
    DequantizeLinear. When both inputs come from convolutions (a downsample shortcut),
    the branch with the longer path back to where they split is the main one (as Model
    Optimizer's build_non_residual_input_map decides); the shortcut keeps its Q/DQ.

    Returns:
        How many Q/DQ pairs were bypassed.
    """
    producers = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    constants = {init.name for init in graph.initializer}
    removed: list[Any] = []
    for add in [n for n in graph.node if n.op_type == "Add" and len(n.input) == 2]:
        if any(name in constants for name in add.input):
            continue  # a bias, not a residual
        candidates = []
        for index, name in enumerate(add.input):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None else None
            conv = producers.get(q.input[0]) if q is not None else None
            if (dq is not None and dq.op_type == "DequantizeLinear" and q is not None
                    and q.op_type == "QuantizeLinear" and conv is not None
                    and conv.op_type == "Conv" and uses[name] == 1 and uses[q.output[0]] == 1
                    and uses[q.input[0]] == 1):
                candidates.append((index, q, dq, conv))
        if len(candidates) == 2:
            depth = [_depth_to_split(c[3], candidates[1 - i][3], producers)
                     for i, c in enumerate(candidates)]
            candidates = [candidates[int(depth[1] > depth[0])]]
        if candidates:
            index, q, dq, _ = candidates[0]
            add.input[index] = q.input[0]
            removed += [q, dq]
    for node in removed:
        graph.node.remove(node)
    return len(removed) // 2


def _ancestors(node: Any, producers: dict[str, Any]) -> dict[str, int]:
    """Every node upstream of ``node`` (by name) with its distance in edges."""
    depth = {node.name: 0}
    frontier = [node]
    while frontier:
        nxt = []
        for current in frontier:
            for name in current.input:
                parent = producers.get(name)
                if parent is not None and parent.name not in depth:
                    depth[parent.name] = depth[current.name] + 1
                    nxt.append(parent)
        frontier = nxt
    return depth


def _depth_to_split(a: Any, b: Any, producers: dict[str, Any]) -> int:
    """Edges from ``a`` back to the nearest node upstream of both ``a`` and ``b``."""
    da, db = _ancestors(a, producers), _ancestors(b, producers)
    common = set(da) & set(db)
    if not common:
        return 0
    return da[min(common, key=lambda n: da[n] + db[n])]
