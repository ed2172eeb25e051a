"""Quantization: INT8 (static, dynamic, QAT), 16-bit floats, mixed precision, k-means.

The verb is ``netshrink.quantize(model, config, calibration=...)``.
"""

from netshrink.quant.kmeans import CodebookHook, KMeansConfig, kmeans_share
from netshrink.quant.ptq import (
    PTQConfig,
    auto_mixed,
    quantize_dynamic_onnx,
    quantize_onnx,
    quantize_openvino,
)
from netshrink.quant.qat import QATConfig, prepare_qat, run_qat, strip_qat

__all__ = [
    "CodebookHook", "KMeansConfig", "PTQConfig", "QATConfig", "auto_mixed", "kmeans_share",
    "prepare_qat", "quantize_dynamic_onnx", "quantize_onnx", "quantize_openvino", "run_qat",
    "strip_qat",
]
