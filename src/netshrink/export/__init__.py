"""Export a model to a file another runtime executes (ONNX, TensorRT-ready ONNX).

The package is also the verb: ``netshrink.export(model, "model.onnx", example_input=x)``.
"""

from netshrink import make_verb_package
from netshrink.export.onnx import ONNX_INPUT, ONNX_OUTPUT, check_onnx, export_onnx, onnx_layer_name

__all__ = ["ONNX_INPUT", "ONNX_OUTPUT", "check_onnx", "export_onnx", "onnx_layer_name"]

make_verb_package(__name__)
