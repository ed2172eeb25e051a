"""ONNX export: the interchange format every CPU runtime and quantizer here reads.

torch's TorchScript-based exporter is used (``dynamo=False``): it needs no extra package,
folds BatchNorm into the preceding convolution in eval mode, and names every node after
the module that made it (``/layer1/layer1.0/conv1/Conv``), which is how quantization
settings given per torch layer (keep ``fc`` in float) find their ONNX nodes.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from netshrink.errors import UserError
from netshrink.limits import clip
from netshrink.models import ModelSpec
from netshrink.models.counting import check_input_shape
from netshrink.runtime.base import model_stats
from netshrink.store.atomic import atomic_write_bytes
from netshrink.store.kinds import ONNX_INFO_KEY, make_info, netshrink_info

__all__ = ["ONNX_INPUT", "ONNX_OUTPUT", "check_onnx", "copy_onnx_info", "export_onnx",
           "onnx_info_text", "onnx_layer_name", "set_onnx_info",
           "with_onnx_info"]

ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"
DEFAULT_OPSET = 17


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    input_shape: Sequence[int],
    opset: int = DEFAULT_OPSET,
    meta: dict[str, Any] | None = None,
    spec: ModelSpec | None = None,
    runtime: str | None = None,
    precision: str | None = None,
) -> Path:
    """Write ``model`` (eval mode, float32) as ONNX with a dynamic batch dimension.

    The caller's model is not changed. The file appears only once fully written. It
    carries, in its ``metadata_props`` (key ``netshrink.model``, one JSON value), what
    ``eval``, ``predict`` and ``bench`` need to use it on its own: ``meta`` (the
    checkpoint meta: dataset, class names, preprocessing, the validation split), the
    spec, the parameter, non-zero and MAC counts of ``model``, and the runtime and
    precision a run measures it in.

    Args:
        model: a float model taking ``[N, *input_shape]`` images.
        path: the ``.onnx`` file to write.
        input_shape: one image, ``[C, H, W]``.
        opset: the ONNX opset (13+ for per-channel QDQ).
        meta: the checkpoint meta (``stages.base.checkpoint_meta``); None: none known.
        spec: the model's spec, when known.
        runtime: the runtime the file is meant to run in (``onnxruntime`` when None).
        precision: the precision it is meant to run at.

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
        _check_one_output(model, example)
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
    except UserError:
        raise
    except Exception as exc:  # the exporter raises many types; all mean "cannot export"
        raise UserError(f"cannot export the model to ONNX: {clip(str(exc), 300)}") from exc
    finally:
        model.train(was_training)
    stats = model_stats(model, list(shape))
    info = make_info(meta=meta, spec=spec.model_dump(mode="json") if spec else None,
                     stats={"params": stats.params, "nonzero_params": stats.nonzero_params,
                            "macs": stats.macs},
                     runtime=runtime, precision=precision)
    atomic_write_bytes(path, with_onnx_info(buffer.getvalue(), info))
    return path


def _check_one_output(model: nn.Module, example: torch.Tensor) -> None:
    """Raise ``UserError`` unless ``model`` returns one tensor (the logits) on ``example``:
    a runtime file, its check against torch and every measurement read one output."""
    with torch.no_grad():
        out = model(example)
    if not isinstance(out, torch.Tensor):
        raise UserError(f"{type(model).__name__} returns a {type(out).__name__}, not one "
                        "tensor: export, quantize and measure take a model whose forward "
                        "returns the logits (wrap it in a module that picks them)")


def with_onnx_info(data: bytes, info: str) -> bytes:
    """Serialized ONNX ``data`` with netshrink's metadata entry set to ``info``."""
    import onnx

    model = onnx.ModelProto()
    model.ParseFromString(data)
    kept = [p for p in model.metadata_props if p.key != ONNX_INFO_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_INFO_KEY, info
    return model.SerializeToString()


def set_onnx_info(path: Path, info: str, **changes: Any) -> None:
    """Give the ONNX file ``path`` netshrink's metadata ``info`` (a ``make_info`` value),
    with ``changes`` to its keys (``runtime=``, ``precision=``); written atomically."""
    if changes:
        value = json.loads(info)
        value.update(changes)
        info = json.dumps(value)
    atomic_write_bytes(path, with_onnx_info(Path(path).read_bytes(), info))


def onnx_info_text(path: Path) -> str | None:
    """The raw netshrink metadata of an ONNX file netshrink wrote; None without it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    raw = props.get(ONNX_INFO_KEY)
    if raw is not None:
        netshrink_info(raw, Path(path))  # checked before it is copied anywhere
    return raw


def copy_onnx_info(source: Path, target: Path, **changes: Any) -> bool:
    """Copy netshrink's metadata from the ONNX file ``source`` to ``target`` (quantizers
    drop or keep ``metadata_props`` as their version pleases); False when ``source`` has
    none."""
    raw = onnx_info_text(source)
    if raw is None:
        return False
    set_onnx_info(target, raw, **changes)
    return True


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


def onnx_to_openvino(
    onnx_file: Path,
    out_xml: Path,
    *,
    model: nn.Module | None = None,
    input_shape: Sequence[int] | None = None,
    batch: int = 4,
    seed: int = 0,
) -> float | None:
    """Convert an ONNX file into OpenVINO IR (``out_xml`` and its ``.bin``) with OpenVINO's
    converter, carrying netshrink's metadata into the IR's ``rt_info``.

    Args:
        onnx_file: the ONNX model (float, or QDQ INT8).
        out_xml: the ``.xml`` to write; the ``.bin`` goes beside it. Both are written
            atomically (the ``.bin`` first).
        model: what the IR should compute (the torch model, or the ONNX file in its
            runtime); with ``input_shape``, compared on a seeded random batch.
        input_shape: one image, ``[C, H, W]``.

    Returns:
        The largest absolute difference between OpenVINO's logits and ``model``'s, or None
        when nothing was compared.

    Raises:
        UserError: OpenVINO missing (naming the extra) or unable to convert the file.
    """
    import tempfile

    from netshrink.runtime.base import Executable, ModelStats
    from netshrink.runtime.sessions import onnx_precision, open_runtime, require
    from netshrink.store.kinds import IR_INFO_KEY

    ov = require("openvino")
    precision = "int8" if onnx_precision(onnx_file).startswith("int8") else "fp32"
    try:
        ir = ov.convert_model(str(onnx_file))
    except Exception as exc:  # OpenVINO raises its own RuntimeError subclasses
        raise UserError(f"{onnx_file}: OpenVINO cannot convert it: "
                        f"{str(exc).splitlines()[0][:200]}") from None
    raw = onnx_info_text(onnx_file)
    if raw is not None:
        info = json.loads(raw)
        info.update(runtime="openvino", precision=precision)
        ir.set_rt_info(json.dumps(info), [IR_INFO_KEY])
    with tempfile.TemporaryDirectory(dir=out_xml.parent) as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(ir, str(xml), compress_to_fp16=False)
        atomic_write_bytes(out_xml.with_suffix(".bin"), xml.with_suffix(".bin").read_bytes())
        atomic_write_bytes(out_xml, xml.read_bytes())
    if model is None or input_shape is None:
        return None
    shape = check_input_shape(input_shape)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    session = open_runtime(out_xml, "openvino", stats=ModelStats(0, 0, None),
                           threads=max(1, torch.get_num_threads()), precision=precision)
    try:
        with torch.inference_mode():
            got = session(x).float().numpy()
            want = model(x).float().numpy()
    finally:
        if isinstance(session, Executable):
            session.close()
    return float(np.abs(got - want).max())
