"""ONNX export: the interchange format every CPU runtime and quantizer here reads.

torch's TorchScript-based exporter is used (``dynamo=False``): it needs no extra package,
folds BatchNorm into the preceding convolution in eval mode, and names every node after
the module that made it (``/layer1/layer1.0/conv1/Conv``), which is how quantization
settings given per torch layer (keep ``fc`` in float) find their ONNX nodes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from netshrink.errors import UserError
from netshrink.models.counting import check_input_shape
from netshrink.store.atomic import atomic_write_bytes

__all__ = ["ONNX_INPUT", "ONNX_OUTPUT", "check_onnx", "export_onnx", "onnx_layer_name"]

ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"
DEFAULT_OPSET = 17


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    input_shape: Sequence[int],
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write ``model`` (eval mode, float32) as ONNX with a dynamic batch dimension.

    The caller's model is not changed. The file appears only once fully written.

    Args:
        model: a float model taking ``[N, *input_shape]`` images.
        path: the ``.onnx`` file to write.
        input_shape: one image, ``[C, H, W]``.
        opset: the ONNX opset (13+ for per-channel QDQ).

    Returns:
        ``path``.

    Raises:
        UserError: a bad shape, or a model the exporter cannot trace.
    """
    shape = check_input_shape(input_shape)
    was_training = model.training
    model.eval()
    example = torch.zeros(1, *shape, dtype=torch.float32)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter warns that it is deprecated; it is chosen on purpose
            # (see the module docstring), so the warning would only confuse users.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), buffer, dynamo=False, opset_version=opset,
                input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; all mean "cannot export"
        raise UserError(f"cannot export the model to ONNX: {str(exc).splitlines()[0]}") from exc
    finally:
        model.train(was_training)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def check_onnx(
    path: Path,
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    batch: int = 4,
    seed: int = 0,
) -> float:
    """Validate an exported file with ``onnx.checker`` and compare its outputs with torch.

    Returns:
        The largest absolute difference between ONNX Runtime's and torch's logits on a
        seeded random batch.

    Raises:
        UserError: the file fails the checker.
    """
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"{path}: not a valid ONNX model: {str(exc).splitlines()[0]}") from None
    shape = check_input_shape(input_shape)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {ONNX_INPUT: x.numpy()})[0]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        want = model(x).float().numpy()
    model.train(was_training)
    return float(np.abs(got - want).max())


def onnx_layer_name(node_name: str) -> str | None:
    """The torch module name an exported node came from, or None if it has no scope.

    The exporter scopes nodes by module, each level named as its parent knows it:
    ``/layer2/layer2.0/downsample/downsample.0/Conv`` is ``layer2.0.downsample.0``.
    """
    parts = [p for p in node_name.split("/") if p][:-1]  # the last part is the op
    if not parts:
        return None
    name = parts[0]
    last = parts[0]
    for part in parts[1:]:
        # A container's children appear as "<container>.<index>" after the container.
        name = name + part[len(last):] if part.startswith(last + ".") else f"{name}.{part}"
        last = part
    return name
