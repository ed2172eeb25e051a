"""Export a model to a file another runtime executes (ONNX)."""

from netshrink.export.onnx import ONNX_INPUT, ONNX_OUTPUT, check_onnx, export_onnx, onnx_layer_name

__all__ = ["ONNX_INPUT", "ONNX_OUTPUT", "check_onnx", "export_onnx", "onnx_layer_name"]
