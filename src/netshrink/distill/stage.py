"""The ``distill.kd`` recipe stage: train the chain's model (the student) against a teacher."""

from __future__ import annotations

from torch import nn

from netshrink.distill.options import DistillOptions, teacher_loss
from netshrink.recipe.stages import StageContext, stage
from netshrink.train.config import TrainConfig
from netshrink.train.stages import run_training


class KDConfig(TrainConfig, DistillOptions):
    """Knowledge distillation: every training option plus the teacher and the loss mix
    (``teacher`` or ``teacher_stage``, ``alpha``, ``temperature``)."""


@stage("distill.kd", KDConfig, "knowledge distillation from a frozen teacher (hard + soft loss)")
def kd_stage(model: nn.Module, cfg: KDConfig, ctx: StageContext) -> nn.Module:
    return run_training(model, cfg, ctx, teacher_loss(cfg, ctx, cfg))
