"""The ``train`` and ``finetune`` recipe stages: both are the one training loop."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from netshrink.distill.options import DistillOptions
from netshrink.stages.base import TRAIN_STATE, StageContext, stage
from netshrink.stages.teacher import teacher_loss
from netshrink.train.config import TrainConfig, fit_batch_size, fractional_epochs
from netshrink.train.loop import LossFn, train


class FinetuneConfig(TrainConfig):
    """Training from a trained model: fewer epochs, a lower lr, a short warm-up; with
    ``distill``, against a teacher (e.g. ``teacher_stage: baseline``, the model before
    compression) instead of the labels alone."""

    # a fraction of an epoch too (compress judges its first candidates after a quarter);
    # int first, so a whole number keeps its cache key
    epochs: int | float = Field(default=1, gt=0, le=10_000, allow_inf_nan=False)
    lr: float = Field(default=0.01, gt=0)
    warmup_epochs: float = Field(default=0.0, ge=0)
    distill: DistillOptions | None = None


def run_training(model: nn.Module, cfg: TrainConfig, ctx: StageContext,
                 loss_fn: LossFn | None = None) -> nn.Module:
    """The one loop as a stage: resumable from the stage's folder, history recorded."""
    result = train(
        model,
        ctx.data,
        cfg,
        device=ctx.device,
        loss_fn=loss_fn,
        state_path=ctx.stage_dir / TRAIN_STATE,
        progress=ctx.progress,
        log=ctx.log,
        fingerprint_extra=ctx.key,
    )
    ctx.history.extend(result.history)
    if result.resumed:
        ctx.notes.append("resumed from an interrupted run")
    return model


@stage("train", TrainConfig, "train the model (from its current weights) with the one loop",
       scratch=(TRAIN_STATE,))
def train_stage(model: nn.Module, cfg: TrainConfig, ctx: StageContext) -> nn.Module:
    return run_training(model, cfg, ctx)


@stage("finetune", FinetuneConfig, "train briefly at a low learning rate (after compression)",
       scratch=(TRAIN_STATE,))
def finetune_stage(model: nn.Module, cfg: FinetuneConfig, ctx: StageContext) -> nn.Module:
    if cfg.epochs != int(cfg.epochs):
        # the loop counts whole epochs: a fraction becomes a step cap its schedule ends
        # at (counted in the batches the training split really gives)
        cfg = fit_batch_size(cfg, ctx.data.train)
        cfg = fractional_epochs(cfg, float(cfg.epochs), len(ctx.data.train))
    else:
        cfg = cfg.model_copy(update={"epochs": int(cfg.epochs)})
    return run_training(model, cfg, ctx, teacher_loss(cfg.distill, ctx, cfg))
