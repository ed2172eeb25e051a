"""The ``distill.kd`` recipe stage: train the chain's model (the student) against a teacher."""

from __future__ import annotations

from torch import nn

from netshrink.distill.options import DistillOptions, teacher_loss
from netshrink.recipe.stages import StageContext, stage
from netshrink.train.config import TrainConfig


class KDConfig(TrainConfig, DistillOptions):
    """Knowledge distillation: every training option plus the teacher and the loss mix
    (``teacher`` or ``teacher_stage``, ``alpha``, ``temperature``)."""


@stage("distill.kd", KDConfig, "knowledge distillation from a frozen teacher (hard + soft loss)")
def kd_stage(model: nn.Module, cfg: KDConfig, ctx: StageContext) -> nn.Module:
    from netshrink.train.loop import train

    loss_fn = teacher_loss(cfg, ctx, label_smoothing=cfg.label_smoothing,
                           channels_last=cfg.channels_last)
    train_cfg = TrainConfig(**cfg.model_dump(include=set(TrainConfig.model_fields)))
    result = train(model, ctx.data, train_cfg, device=ctx.device,
                   state_path=ctx.stage_dir / "train_state.safetensors", loss_fn=loss_fn,
                   progress=ctx.progress, log=ctx.log, fingerprint_extra=ctx.key)
    ctx.history.extend(result.history)
    return model
