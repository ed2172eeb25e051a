"""Recipe stages that export and quantize: ``export.onnx``, ``quant.ptq``, ``quant.dynamic``,
``quant.fp16``, ``quant.bf16``, ``quant.qat`` and ``quant.kmeans``.

Each returns a ``Deployed``: the file a runtime executes, measured in that runtime.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from netshrink.bench.accuracy import evaluate
from netshrink.bench.measure import artifact_size
from netshrink.errors import UserError
from netshrink.export.onnx import check_onnx, export_onnx
from netshrink.models import ModelSpec
from netshrink.quant.calibration import calibration_batches
from netshrink.quant.kmeans import CodebookHook, KMeansConfig, kmeans_share
from netshrink.quant.ptq import (
    PTQConfig,
    auto_mixed,
    check_int8_bits,
    quantize_dynamic_onnx,
    quantize_onnx,
    quantize_openvino,
)
from netshrink.quant.qat import QATConfig, run_qat
from netshrink.runtime import ModelStats, model_stats, open_runtime
from netshrink.stages.base import Deployed, StageContext, stage
from netshrink.stages.teacher import teacher_loss
from netshrink.stages.train import FinetuneConfig
from netshrink.store.atomic import atomic_write_text
from netshrink.store.walls import make_dirs
from netshrink.train.config import fit_batch_size, fractional_epochs
from netshrink.train.loop import train

# How close an exported float model must be to torch; a bigger gap is an export bug.
EXPORT_ATOL = 1e-3


class ExportConfig(BaseModel):
    """Float ONNX export (the ``export.onnx`` stage)."""

    model_config = ConfigDict(extra="forbid")

    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    opset: int = Field(default=17, ge=13, le=21)


class DynamicConfig(BaseModel):
    """Dynamic INT8 (the ``quant.dynamic`` stage): int8 weights, activations quantized per
    call from their observed range; no calibration."""

    model_config = ConfigDict(extra="forbid")

    per_channel: bool = True
    bits: int = 8

    @field_validator("bits")
    @classmethod
    def _only_int8(cls, bits: int) -> int:
        return check_int8_bits(bits)


class HalfConfig(BaseModel):
    """16-bit floats (``quant.fp16`` / ``quant.bf16``): a half-size weights file.

    ``runtime: torch`` saves a 16-bit safetensors file (fp16 computes in fp32 on a CPU,
    in fp16 on a GPU; bf16 computes in bf16). ``runtime: openvino`` exports ONNX and runs
    it with OpenVINO's 16-bit inference precision.
    """

    model_config = ConfigDict(extra="forbid")

    runtime: Literal["torch", "openvino"] = "torch"


class Fp16Config(HalfConfig):
    """fp16 weights (``quant.fp16``): see ``HalfConfig``."""


class Bf16Config(HalfConfig):
    """bf16 weights and compute (``quant.bf16``): see ``HalfConfig``."""


def checked_export(model: nn.Module, path: Path, *, input_shape: list[int], opset: int = 17,
                   meta: dict | None = None, spec: ModelSpec | None = None,
                   runtime: str | None = None, precision: str | None = None,
                   name: str | None = None) -> float:
    """Export ``model`` to ONNX at ``path``, run the checker and compare with torch: the
    one export-and-check of every stage, verb and ``netshrink export``. Returns the
    largest difference from torch on random images.

    Raises:
        UserError: integer or 16-bit weights, or an export that differs from torch by
            more than ``EXPORT_ATOL`` (``name`` names the model in the message).
    """
    dtypes = {p.dtype for p in model.parameters()}
    if any(not dtype.is_floating_point for dtype in dtypes):
        raise UserError("the model holds integer weights (already quantized); export the "
                        "float model it came from")
    if dtypes - {torch.float32}:  # fp16/bf16 weights: the export and its check run fp32
        raise UserError(f"the model holds {', '.join(sorted(map(str, dtypes)))} weights; "
                        "export the float32 model it came from")
    export_onnx(model, path, input_shape=input_shape, opset=opset, meta=meta or {},
                spec=spec, runtime=runtime, precision=precision)
    diff = check_onnx(path, model, input_shape=input_shape)
    if diff > EXPORT_ATOL:
        raise UserError(f"{name or path}: the ONNX export differs from torch by {diff:.2e} "
                        f"(more than {EXPORT_ATOL}); report this model as an export bug")
    return diff


def export_checked(model: nn.Module, path: Path, ctx: StageContext, *, opset: int = 17,
                   runtime: str | None = None, precision: str | None = None) -> Path:
    """``checked_export`` in a stage: the file carries the stage's checkpoint meta, spec
    and counts, and ``runtime``/``precision`` when the run measures it other than in ONNX
    Runtime as is; the result is noted.

    Raises:
        UserError: as ``checked_export``.
    """
    diff = checked_export(model, path, input_shape=ctx.input_shape, opset=opset,
                          meta=ctx.meta, spec=ctx.spec, runtime=runtime, precision=precision)
    ctx.notes.append(f"ONNX (opset {opset}) passes onnx.checker; max |ONNX Runtime - torch| "
                     f"= {diff:.1e} on 4 random images")
    return path


def onnx_int8_result(float_onnx: Path, int8_onnx: Path, stats: ModelStats,
                     precision: str = "int8") -> Deployed:
    """An INT8 ONNX file as a stage's result, packed beside it (sparse int8 weights +
    zstd) so its size is recorded next to those of the float and the INT8 files."""
    from netshrink.store.packed_onnx import pack_onnx

    packed = int8_onnx.with_suffix(".nspk")
    pack_onnx(int8_onnx, packed)
    return Deployed(file=int8_onnx, runtime="onnxruntime", precision=precision, stats=stats,
                    sizes={"float_onnx": artifact_size(float_onnx),
                           "packed": artifact_size(packed)})


@stage("export.onnx", ExportConfig, "float ONNX export, run in ONNX Runtime or OpenVINO",
       chains=False)
def export_stage(model: nn.Module, cfg: ExportConfig, ctx: StageContext) -> Deployed:
    path = export_checked(model, ctx.stage_dir / "model.onnx", ctx, opset=cfg.opset,
                          runtime=cfg.runtime, precision="fp32")
    return Deployed(file=path, runtime=cfg.runtime, precision="fp32",
                    stats=model_stats(model, ctx.input_shape))


def _top1_on_val(ctx: StageContext, images: int, stats: ModelStats
                 ) -> Callable[[Path], float]:
    split = ctx.data.val
    if split is None:
        raise UserError("accuracy_budget needs held-out images to judge each layer on: set "
                        "data.val_size (e.g. 5000) in a recipe, give val= in Python")

    def top1(path: Path) -> float:
        session = open_runtime(path, "onnxruntime", stats=stats, threads=torch.get_num_threads())
        return evaluate(session, split, batch_size=256, max_images=images,
                        split_name="val").top1

    return top1


@stage("quant.ptq", PTQConfig,
       "static INT8 post-training quantization (ONNX Runtime QDQ or OpenVINO/NNCF), mixed",
       chains=False)
def ptq_stage(model: nn.Module, cfg: PTQConfig, ctx: StageContext) -> Deployed:
    stats = model_stats(model, ctx.input_shape)
    batches = calibration_batches(ctx.data.calib, input_shape=ctx.input_shape,
                                  images=cfg.calibration_images)
    float_onnx = export_checked(model, ctx.stage_dir / "float.onnx", ctx)
    images = sum(b.shape[0] for b in batches)
    if cfg.runtime == "openvino":
        folder = make_dirs(ctx.stage_dir / "openvino")
        quantize_openvino(float_onnx, folder / "model.xml", batches, cfg)
        ctx.notes.append(f"NNCF INT8, {'per-channel' if cfg.per_channel else 'per-tensor'} "
                         f"weights, calibrated on {images} images")
        return Deployed(file=folder, runtime="openvino", precision="int8", stats=stats,
                        sizes={"float_onnx": artifact_size(float_onnx)})
    out = ctx.stage_dir / "model.onnx"
    if cfg.accuracy_budget is not None:
        _, kept, trace = auto_mixed(float_onnx, out, batches, cfg, budget=cfg.accuracy_budget,
                                    top1=_top1_on_val(ctx, cfg.budget_images, stats),
                                    log=ctx.log)
        atomic_write_text(ctx.stage_dir / "mixed.json", json.dumps(trace, indent=2))
        ctx.notes.append(f"automatic mixed precision (budget {cfg.accuracy_budget} pt on "
                         f"{cfg.budget_images} val images): float layers: "
                         f"{', '.join(kept) or 'none'}")
    else:
        quantize_onnx(float_onnx, out, batches, cfg)
        if cfg.exclude:
            ctx.notes.append(f"layers kept in float: {', '.join(cfg.exclude)}")
    ctx.notes.append(f"ONNX Runtime QDQ INT8: {cfg.activations} activations, int8 "
                     f"{'per-channel' if cfg.per_channel else 'per-tensor'} weights, "
                     f"{cfg.calibration} calibration on {images} images")
    return onnx_int8_result(float_onnx, out, stats)


@stage("quant.dynamic", DynamicConfig,
       "dynamic INT8 (ONNX Runtime): int8 weights, activations quantized at run time",
       chains=False)
def dynamic_stage(model: nn.Module, cfg: DynamicConfig, ctx: StageContext) -> Deployed:
    stats = model_stats(model, ctx.input_shape)
    float_onnx = export_checked(model, ctx.stage_dir / "float.onnx", ctx)
    out = quantize_dynamic_onnx(float_onnx, ctx.stage_dir / "model.onnx",
                                per_channel=cfg.per_channel)
    ctx.notes.append("dynamic INT8 computes convolutions as ConvInteger with activations "
                     "quantized on every call; on x86 CPUs that is usually slower than float")
    return onnx_int8_result(float_onnx, out, stats, precision="int8-dynamic")


def _half(model: nn.Module, cfg: HalfConfig, ctx: StageContext, precision: str) -> Deployed:
    stats = model_stats(model, ctx.input_shape)
    if cfg.runtime == "openvino":
        path = export_checked(model, ctx.stage_dir / "model.onnx", ctx, runtime="openvino",
                              precision=precision)
        ctx.notes.append(f"OpenVINO runs the float ONNX with inference precision {precision}; "
                         "it falls back to fp32 on CPUs without native support")
        return Deployed(file=path, runtime="openvino", precision=precision, stats=stats)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    path = ctx.stage_dir / f"model.{precision}.safetensors"
    saved = ctx.save_torch(model.to(dtype), path, meta={**ctx.meta, "precision": precision})
    if precision == "fp16" and ctx.device == "cpu":
        ctx.notes.append("fp16 is a storage format on a CPU: the file is half the size and "
                         "the model computes in fp32 (emulated fp16 is several times slower)")
    return Deployed(file=saved, runtime="torch", precision=precision, stats=stats)


@stage("quant.fp16", Fp16Config, "fp16 weights file (half size); fp16 compute on GPUs",
       chains=False)
def fp16_stage(model: nn.Module, cfg: Fp16Config, ctx: StageContext) -> Deployed:
    return _half(model, cfg, ctx, "fp16")


@stage("quant.bf16", Bf16Config, "bf16 weights and compute (CPUs with bf16, GPUs)",
       chains=False)
def bf16_stage(model: nn.Module, cfg: Bf16Config, ctx: StageContext) -> Deployed:
    return _half(model, cfg, ctx, "bf16")


@stage("quant.kmeans", KMeansConfig,
       "k-means weight sharing (2^bits values per layer, zeros kept), packed codebook file")
def kmeans_stage(model: nn.Module, cfg: KMeansConfig, ctx: StageContext) -> Deployed:
    codebooks = kmeans_share(model, bits=cfg.bits, include=cfg.include, exclude=cfg.exclude,
                             max_iter=cfg.max_iter)
    if cfg.finetune_epochs > 0:

        train_cfg = fractional_epochs(fit_batch_size(FinetuneConfig(lr=cfg.finetune_lr),
                                                     ctx.data.train),
                                      cfg.finetune_epochs, len(ctx.data.train))
        result = train(model, ctx.data, train_cfg,
                       device=ctx.device, step_hooks=[CodebookHook(codebooks)],
                       progress=ctx.progress, log=ctx.log)
        ctx.history.extend(result.history)
    model = model.cpu().eval()
    path = ctx.save_torch(model, ctx.stage_dir / "model.nspk", codebooks=codebooks)
    ctx.notes.append(f"{len(codebooks)} layers share at most {2 ** cfg.bits} values each; "
                     "the packed file stores bit-packed indices, codebooks and zero bitmasks, "
                     "zstd-coded, and reloads to these exact weights")
    return Deployed(file=path, runtime="torch", precision=f"fp32, {cfg.bits}-bit k-means",
                    stats=model_stats(model, ctx.input_shape), model=model,
                    codebooks=codebooks)


@stage("quant.qat", QATConfig,
       "quantization-aware training, exported to ONNX Runtime QDQ INT8 with its learned ranges",
       chains=False)
def qat_stage(model: nn.Module, cfg: QATConfig, ctx: StageContext) -> Deployed:
    stats = model_stats(model, ctx.input_shape)
    stripped, ranges, result = run_qat(model, ctx.data, cfg, device=ctx.device, log=ctx.log,
                                       progress=ctx.progress,
                                       loss_fn=teacher_loss(cfg.distill, ctx, cfg))
    ctx.history.extend(result.history)
    stripped = stripped.cpu()
    float_onnx = export_checked(stripped, ctx.stage_dir / "float.onnx", ctx)
    # Weights are already on ONNX Runtime's int8 grid, and the activation ranges are the
    # ones training adapted to; calibration only fills the tensors QAT did not observe
    # (convolution outputs, residual adds).
    batches = calibration_batches(ctx.data.calib, input_shape=ctx.input_shape)
    out = ctx.stage_dir / "model.onnx"
    quantize_onnx(float_onnx, out, batches, PTQConfig(per_channel=cfg.per_channel),
                  input_ranges=ranges)
    kind = "per-channel" if cfg.per_channel else "per-tensor"
    ctx.notes.append(f"QAT ({cfg.epochs} epochs, {kind} weights) exported to ONNX Runtime "
                     "QDQ INT8 with the learned input ranges")
    return onnx_int8_result(float_onnx, out, stats)
