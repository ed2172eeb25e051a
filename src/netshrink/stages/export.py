"""The ``export.tensorrt`` recipe stage: TensorRT-ready ONNX forms and their trtexec commands.

No TensorRT runs here: the stage writes the forms and ``trtexec.sh`` for users who have
it, checks every file against TensorRT's documented rules, and measures one form (INT8
by default) in ONNX Runtime on the CPU like every other exported model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from netshrink.bench.measure import artifact_size
from netshrink.errors import UserError
from netshrink.export.onnx import copy_onnx_info
from netshrink.export.tensorrt import FILES, FORMS, export_tensorrt
from netshrink.quant.calibration import calibration_batches
from netshrink.runtime import model_stats, require
from netshrink.stages.base import Deployed, StageContext, stage
from netshrink.stages.quant import export_checked

Form = Literal["fp32", "fp16", "int8"]


class TensorRTConfig(BaseModel):
    """TensorRT-ready export (the ``export.tensorrt`` stage)."""

    model_config = ConfigDict(extra="forbid")

    forms: list[Form] = Field(default_factory=lambda: list(FORMS), min_length=1)
    measure: Form = "int8"  # the form the runner measures in ONNX Runtime (CPU)
    calibration_images: int | None = Field(default=None, gt=0)  # default: the calib split
    opt_batch: int = Field(default=8, gt=0)  # the batch trtexec tunes the engine for
    max_batch: int = Field(default=32, gt=0)  # the largest batch the engine accepts
    opset: int = Field(default=17, ge=13, le=20)  # 13+: per-channel Q/DQ; 20: TensorRT 10.0
    # What measures the ``measure`` form: ONNX Runtime on the CPU, or TensorRT itself on
    # the recipe's GPU (``pip install 'netshrink[tensorrt]'``; unverified here).
    runtime: Literal["onnxruntime", "tensorrt"] = "onnxruntime"

    @model_validator(mode="after")
    def _consistent(self) -> TensorRTConfig:
        if len(set(self.forms)) != len(self.forms):
            raise ValueError(f"forms {self.forms} lists a form twice; list each once")
        if self.measure not in self.forms:
            raise ValueError(f"measure {self.measure!r} is not among forms {self.forms}; add "
                             f"it to forms or measure one of {', '.join(self.forms)}")
        if self.opt_batch > self.max_batch:
            raise ValueError(f"opt_batch {self.opt_batch} is above max_batch {self.max_batch}; "
                             "raise max_batch or lower opt_batch")
        return self


def _check_tensorrt(cfg: TensorRTConfig, device: str) -> None:
    """``runtime: tensorrt`` needs a GPU and TensorRT installed.

    Raises:
        UserError: naming the fix.
    """
    if cfg.runtime == "tensorrt":
        if not device.startswith("cuda"):
            raise UserError("runtime: tensorrt measures on an NVIDIA GPU; set the recipe's "
                            "device to cuda, or runtime: onnxruntime")
        require("tensorrt")


@stage("export.tensorrt", TensorRTConfig,
       "TensorRT-ready ONNX (fp32, fp16, QDQ int8) and their trtexec commands; measured in "
       "ONNX Runtime", chains=False, check=_check_tensorrt)
def tensorrt_stage(model: nn.Module, cfg: TensorRTConfig, ctx: StageContext) -> Deployed:
    _check_tensorrt(cfg, ctx.device)  # also checked by the run before it writes
    stats = model_stats(model, ctx.input_shape)
    batches = (calibration_batches(ctx.data.calib, input_shape=ctx.input_shape,
                                   images=cfg.calibration_images)
               if "int8" in cfg.forms else [])
    with tempfile.TemporaryDirectory(dir=ctx.stage_dir) as tmp:
        # The float export every form starts from, checked against torch (and noted).
        fp32 = ctx.stage_dir / FILES["fp32"] if "fp32" in cfg.forms else Path(tmp) / "float.onnx"
        export_checked(model, fp32, ctx, opset=cfg.opset)
        result = export_tensorrt(model, ctx.stage_dir, input_shape=ctx.input_shape,
                                 batches=batches, forms=cfg.forms, opset=cfg.opset,
                                 opt_batch=cfg.opt_batch, max_batch=cfg.max_batch,
                                 float_onnx=fp32)
        for path in result.files.values():  # each form carries the stage's meta and counts
            if path != fp32:
                copy_onnx_info(fp32, path)
    source = f"{result.images} calibration images" if batches else \
        f"{result.images} random images"
    for form, path in result.files.items():
        command = result.commands[form]
        ctx.notes.append(
            f"{form} ({path.name}): passes onnx.checker and the static TensorRT checks; max |ONNX "
            f"Runtime - torch| = {result.max_diff[form]:.1e} (SNR {result.snr_db[form]:.1f} dB) "
            f"on {source}; build: {command.build}; time: {command.time}")
    if result.clamped:
        ctx.notes.append(f"fp16: {result.clamped} weights beyond ±65504 were clamped to it")
    if batches:
        ctx.notes.append(f"int8: symmetric QDQ (signed int8, zero points 0), per-channel "
                         f"weights, min-max calibration on {sum(len(b) for b in batches)} "
                         "images")
    options = None
    if cfg.runtime == "tensorrt":
        # The measured engine covers the batches the measurement uses (eval batches too).
        options = {"opt_batch": cfg.opt_batch, "max_batch": cfg.max_batch}
        ctx.notes.append(f"{cfg.measure} measured by TensorRT itself on the GPU (engine for "
                         f"batches 1-{cfg.max_batch}, tuned for {cfg.opt_batch}); "
                         f"{result.script.name} builds and times every form with trtexec")
    else:
        ctx.notes.append(f"run {result.script.name} in the stage folder to build and time "
                         "the engines (TensorRT 10+, NVIDIA GPU); TensorRT did not run here")
    return Deployed(file=result.files[cfg.measure], runtime=cfg.runtime, options=options,
                    precision=cfg.measure, stats=stats,
                    sizes={f"{form}_onnx": artifact_size(path)
                           for form, path in result.files.items()})
