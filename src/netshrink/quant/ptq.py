"""Static INT8 post-training quantization into a file a real INT8 runtime executes.

Two quantizers, both reading the same float ONNX export:

* ONNX Runtime's ``quantize_static`` in QDQ format (the default). Activations are uint8:
  with int8 activations ONNX Runtime fuses only some convolutions into integer kernels
  and the model is often slower than float (measured in shared/notes/cpu-runtimes.md).
  Weights are int8 symmetric, per channel or per tensor. Calibration: min-max,
  percentile or entropy (KL). ONNX Runtime's fourth method, "distribution", is meant for
  float8 scaling: used for INT8 it took the quickstart ResNet-18 from 91.81% to 47.78%
  top-1, so it is not offered. The result runs in ONNX Runtime and, being
  standard QDQ, in OpenVINO and TensorRT too.
* NNCF (OpenVINO's quantizer), writing OpenVINO IR (``.xml`` + ``.bin``).

Mixed precision is expressed as layers left in float, named like torch names them
(``fc``, ``layer4.*``); ``auto_mixed`` chooses them by measured sensitivity.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from netshrink.errors import UserError
from netshrink.export.calibration_reader import CalibrationReader
from netshrink.export.onnx import onnx_info_text, onnx_layer_name, with_onnx_info
from netshrink.runtime.sessions import onnx_precision, require
from netshrink.store.atomic import atomic_write_bytes
from netshrink.store.kinds import IR_INFO_KEY

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

__all__ = [
    "PTQConfig",
    "check_int8_bits",
    "quantizable_layers",
    "quantize_dynamic_onnx",
    "quantize_onnx",
    "quantize_openvino",
]

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


class PTQConfig(BaseModel):
    """Static post-training quantization (the ``quant.ptq`` stage)."""

    model_config = ConfigDict(extra="forbid")

    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    bits: int = 8
    per_channel: bool = True  # weights: one scale per output channel, else one per tensor
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(default=99.999, gt=50, le=100)  # for calibration: percentile
    calibration_images: int | None = Field(default=None, gt=0)  # default: the calib split
    activations: Literal["uint8", "int8"] = "uint8"
    reduce_range: bool = False  # 7-bit weights, for CPUs whose int8 dot products saturate
    # Layer selection, as every method says it: the layers quantized (empty: all) and
    # those left in float (mixed precision; ``keep_float``, its older name, still reads).
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list,
                               validation_alias=AliasChoices("exclude", "keep_float"))
    # Automatic mixed precision: return layers to float, most sensitive first, until the
    # top-1 drop on ``budget_images`` validation images is at most this many points.
    accuracy_budget: float | None = Field(default=None, gt=0, le=100)
    budget_images: int = Field(default=2000, gt=0)

    @field_validator("bits")
    @classmethod
    def _only_int8(cls, bits: int) -> int:
        return check_int8_bits(bits)

    @property
    def keep_float(self) -> list[str]:
        """The layers left in float: ``exclude`` by its older name."""
        return self.exclude


def check_int8_bits(bits: int) -> int:
    """The bit-width of INT8 quantization (static or dynamic): 8 and nothing else.

    Raises:
        ValueError: any other width, naming the method that offers fewer bits.
    """
    if bits != 8:
        raise ValueError(f"INT8 quantization runs on INT8 kernels, so bits must be 8 (got "
                         f"{bits}); for fewer bits per weight use quant.kmeans (bits 1-8)")
    return bits


def _layer_nodes(onnx_file: Path) -> dict[str, Any]:
    """Torch layer name -> the ONNX node (``NodeProto``) the quantizer would quantize."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    nodes = {onnx_layer_name(n.name): n for n in graph.node if n.op_type in QUANTIZED_OPS}
    nodes.pop(None, None)  # a node without a module scope has no torch name to match
    return nodes  # type: ignore[return-value]


def quantizable_layers(float_onnx: Path) -> dict[str, str]:
    """Torch layer name -> ONNX node name, for every node the quantizer would quantize."""
    return {layer: node.name for layer, node in _layer_nodes(float_onnx).items()}


def match_layers(patterns: Sequence[str], layers: dict[str, str], key: str = "exclude"
                 ) -> list[str]:
    """ONNX node names of the layers matching any pattern.

    Raises:
        UserError: a pattern matching no layer (a typo would silently quantize it).
    """
    nodes: list[str] = []
    for pattern in patterns:
        hits = [node for layer, node in layers.items() if fnmatch.fnmatchcase(layer, pattern)]
        if not hits:
            raise UserError(f"{key} pattern {pattern!r} matches no quantizable layer; "
                            f"layers: {', '.join(layers)}")
        nodes.extend(h for h in hits if h not in nodes)
    return nodes


def float_layers(cfg: PTQConfig, float_onnx: Path) -> list[str]:
    """ONNX node names ``cfg`` leaves in float: ``exclude``'s, and with ``include`` every
    layer it does not name."""
    layers = quantizable_layers(float_onnx)
    nodes = match_layers(cfg.exclude, layers)
    if cfg.include:
        chosen = set(match_layers(cfg.include, layers, key="include"))
        nodes += [node for node in layers.values() if node not in chosen and node not in nodes]
    return nodes


def _check_float(path: Path) -> None:
    precision = onnx_precision(path)
    if precision != "fp32":
        raise UserError(f"{path}: the model is already quantized ({precision}); "
                        "quantize the float model it came from")


def quantize_onnx(
    float_onnx: Path,
    out: Path,
    batches: Sequence[np.ndarray],
    cfg: PTQConfig,
    *,
    exclude_nodes: Sequence[str] = (),
    calibration_cache: Path | None = None,
    input_ranges: dict[str, tuple[float, float]] | None = None,
) -> Path:
    """Quantize a float ONNX file with ONNX Runtime into a QDQ INT8 file.

    Args:
        float_onnx: the float model (``export_onnx``'s output).
        out: the INT8 ``.onnx`` to write (atomically).
        batches: calibration images, float32 ``[N, C, H, W]``.
        cfg: the settings.
        exclude_nodes: ONNX node names left in float (besides ``cfg``'s selection).
        calibration_cache: a JSON file of tensor ranges: reused when it exists, written
            when it does not (the automatic mixed mode quantizes many times).
        input_ranges: ``(rmin, rmax)`` of the input of torch layers by name, used instead
            of calibrated ones (the ranges quantization-aware training learned).

    Raises:
        UserError: an already quantized input, no calibration data, or a bad pattern.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _check_float(float_onnx)
    if not batches:
        raise UserError("the calibration set is empty; give at least one batch of images")
    excluded = float_layers(cfg, float_onnx) + list(exclude_nodes)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    # "Strided" calibration feeds one batch at a time and merges its ranges or histograms
    # into the running ones: the histogram methods otherwise keep every activation of
    # every image in memory (tens of GB for ResNet-50 at 224 on 512 images).
    extra: dict[str, object] = {"CalibPercentile": cfg.percentile, "CalibStridedMinMax": 1}
    act = QuantType.QUInt8 if cfg.activations == "uint8" else QuantType.QInt8
    # ONNX Runtime's calibrators print progress lines to stdout; a recipe's log is ours.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, redirect_stdout(io.StringIO()):
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_onnx), str(prepared), skip_symbolic_shape=True)
        target = Path(tmp) / "int8.onnx"
        if input_ranges:
            extra["TensorQuantOverrides"] = _input_overrides(prepared, input_ranges)
        quantize_static(
            str(prepared), str(target), CalibrationReader(batches), quant_format=QuantFormat.QDQ,
            per_channel=cfg.per_channel, reduce_range=cfg.reduce_range, activation_type=act,
            weight_type=QuantType.QInt8, nodes_to_exclude=excluded, calibrate_method=method,
            extra_options=extra,
            calibration_cache_path=str(calibration_cache) if calibration_cache else None,
        )
        atomic_write_bytes(out, _keep_info(float_onnx, target.read_bytes()))
    return out


def _keep_info(float_onnx: Path, quantized: bytes) -> bytes:
    """The quantized model with the float model's netshrink metadata (ONNX Runtime's
    pre-processing and quantizers do not all keep ``metadata_props``): dataset, class
    names, preprocessing and counts stay with the file ``eval`` and ``predict`` read."""
    raw = onnx_info_text(float_onnx)
    return quantized if raw is None else with_onnx_info(quantized, raw)


def _input_overrides(onnx_file: Path, ranges: dict[str, tuple[float, float]]
                     ) -> dict[str, list[dict[str, np.float32]]]:
    """ONNX Runtime's per-tensor range overrides for the inputs of the named layers."""
    nodes = _layer_nodes(onnx_file)
    missing = set(ranges) - set(nodes)
    if missing:
        raise UserError(f"learned ranges for layers the ONNX file does not have: "
                        f"{', '.join(sorted(missing))}")
    return {nodes[layer].input[0]: [{"rmin": np.float32(rmin), "rmax": np.float32(rmax)}]
            for layer, (rmin, rmax) in ranges.items()}


def quantize_dynamic_onnx(float_onnx: Path, out: Path, *, per_channel: bool = True) -> Path:
    """Dynamic INT8 with ONNX Runtime: int8 weights, activations quantized on every call.

    Raises:
        UserError: an already quantized input.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _check_float(float_onnx)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / "dynamic.onnx"
        quantize_dynamic(str(float_onnx), str(target), per_channel=per_channel,
                         weight_type=QuantType.QInt8)
        atomic_write_bytes(out, _keep_info(float_onnx, target.read_bytes()))
    return out


def quantize_openvino(
    float_onnx: Path,
    out_xml: Path,
    batches: Sequence[np.ndarray],
    cfg: PTQConfig,
) -> Path:
    """Quantize a float ONNX file with NNCF into OpenVINO IR (``.xml`` + ``.bin``).

    NNCF quantizes weights symmetrically per channel by default and activations per
    tensor; ``per_channel: false`` switches weights to per tensor. Only min-max
    calibration is offered here; the other methods are ONNX Runtime's.

    Raises:
        UserError: OpenVINO/NNCF missing (names the extra), an unsupported calibration,
            an already quantized input or a bad ``include``/``exclude`` pattern.
    """
    ov = require("openvino")
    nncf = require("nncf")
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        QuantizationParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    _check_float(float_onnx)
    if cfg.calibration != "minmax":
        raise UserError(f"calibration {cfg.calibration!r} is offered with runtime onnxruntime; "
                        "with runtime openvino use calibration: minmax")
    if cfg.activations != "uint8" or cfg.reduce_range:
        raise UserError("activations/reduce_range are ONNX Runtime settings; NNCF chooses "
                        "them itself for runtime openvino")
    if not batches:
        raise UserError("the calibration set is empty; give at least one batch of images")
    ignored = float_layers(cfg, float_onnx)
    model = ov.Core().read_model(str(float_onnx))
    advanced = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=cfg.per_channel),
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
    )
    quantized = nncf.quantize(
        model, nncf.Dataset(list(batches)), subset_size=len(batches),
        ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
        advanced_parameters=advanced,
    )
    raw = onnx_info_text(float_onnx)
    if raw is not None:  # the IR carries what the ONNX file carried, as the run runs it
        info = json.loads(raw)
        info.update(runtime="openvino", precision="int8")
        quantized.set_rt_info(json.dumps(info), [IR_INFO_KEY])
    with tempfile.TemporaryDirectory(dir=out_xml.parent) as tmp:
        xml = Path(tmp) / out_xml.name
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        atomic_write_bytes(out_xml.with_suffix(".bin"), xml.with_suffix(".bin").read_bytes())
        atomic_write_bytes(out_xml, xml.read_bytes())
    return out_xml


def auto_mixed(
    float_onnx: Path,
    out: Path,
    batches: Sequence[np.ndarray],
    cfg: PTQConfig,
    *,
    top1: Callable[[Path], float],
    budget: float,
    log: Callable[[str], None] = LOG.info,
) -> tuple[Path, list[str], list[dict[str, float | str]]]:
    """Quantize everything, then return layers to float until the drop is within budget.

    Sensitivity is measured, not guessed: each layer's gain is the top-1 of the model
    with only that layer left in float minus that of the fully quantized model. Layers
    go back to float in order of gain (the most sensitive first), re-quantizing and
    re-measuring after each, until ``float top-1 - quantized top-1 <= budget``.
    Calibration runs once; every later quantization reuses its cached ranges.

    Args:
        top1: top-1 accuracy (fraction) of an ONNX file on the held-out images.
        budget: the allowed drop in points (0.5 = half a percentage point).

    Returns:
        ``(out, layers left in float, the trace of each decision)``.
    """
    layers = quantizable_layers(float_onnx)
    nodes_to_layer = {node: layer for layer, node in layers.items()}
    base = top1(float_onnx)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cache = Path(tmp) / "ranges.json"
        trial = Path(tmp) / "trial.onnx"
        quantize_onnx(float_onnx, out, batches, cfg, calibration_cache=cache)
        acc = top1(out)
        trace: list[dict[str, float | str]] = [{"step": "all int8", "top1": acc}]
        log(f"auto mixed: float top-1 {base:.4f}, all INT8 {acc:.4f}, budget {budget} pt")
        if (base - acc) * 100 <= budget:
            return out, list(cfg.keep_float), trace
        fixed = set(match_layers(cfg.keep_float, layers))
        gains: list[tuple[float, str]] = []
        for node in layers.values():
            if node in fixed:
                continue
            quantize_onnx(float_onnx, trial, batches, cfg, exclude_nodes=[node],
                          calibration_cache=cache)
            gains.append((top1(trial) - acc, node))
        gains.sort(key=lambda g: -g[0])
        kept: list[str] = []
        for gain, node in gains:
            kept.append(node)
            quantize_onnx(float_onnx, out, batches, cfg, exclude_nodes=kept,
                          calibration_cache=cache)
            acc = top1(out)
            trace.append({"step": f"float {nodes_to_layer[node]}", "gain": gain, "top1": acc})
            log(f"auto mixed: + {nodes_to_layer[node]} in float (alone +{gain * 100:.2f} pt)"
                f" -> top-1 {acc:.4f}")
            if (base - acc) * 100 <= budget:
                break
    return out, [*cfg.keep_float, *(nodes_to_layer[n] for n in kept)], trace
