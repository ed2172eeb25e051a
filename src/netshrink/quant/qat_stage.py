"""The ``quant.qat`` recipe stage: fake-quant fine-tuning, then the same INT8 runtime as PTQ."""

from __future__ import annotations

from torch import nn

from netshrink.distill.options import teacher_loss
from netshrink.quant.calibration import calibration_batches
from netshrink.quant.ptq import PTQConfig, quantize_onnx
from netshrink.quant.qat import QATConfig, run_qat
from netshrink.quant.stages import export_checked, onnx_int8_result
from netshrink.recipe.stages import Deployed, StageContext, stage
from netshrink.runtime import model_stats


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
