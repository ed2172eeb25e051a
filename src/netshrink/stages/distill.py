"""The ``distill.kd`` recipe stage: train a student against a frozen teacher."""

from __future__ import annotations

from pydantic import model_validator
from torch import nn

from netshrink.distill.options import TeacherFields
from netshrink.stages.base import TRAIN_STATE, StageContext, stage
from netshrink.stages.start import ModelSection, start_model
from netshrink.stages.teacher import teacher_loss
from netshrink.stages.train import run_training
from netshrink.store.checkpoint import load_model
from netshrink.train.config import TrainConfig


class KDConfig(TrainConfig, TeacherFields):
    """Knowledge distillation: every training option, the loss mix (``alpha``,
    ``temperature``) and who teaches whom.

    With ``student`` (a model section: ``{arch: resnet18}``, fresh, or with ``weights``
    a trained one) or ``student_stage`` (an earlier stage's model, e.g. the same student
    trained without a teacher), the stage's input model is the teacher and the student
    it trains continues the chain: ``train`` a ResNet-50, then ``distill.kd`` with
    ``student: {arch: resnet18}``. Without either, the input model is the student and
    ``teacher`` (a file) or ``teacher_stage`` (an earlier stage) names the teacher.
    ``alpha: 1`` is plain cross-entropy (the teacher is not run): the no-teacher
    control of a KD study, on the same student, seed and budget.
    """

    student: ModelSection | None = None
    student_stage: str | None = None

    @model_validator(mode="after")
    def _who_teaches(self) -> KDConfig:
        if self.student is not None and self.student_stage is not None:
            raise ValueError("give one of student (a model section) or student_stage (an "
                             "earlier stage's model), not both")
        self._check_teacher(required=self.student is None and self.student_stage is None)
        return self


@stage("distill.kd", KDConfig, "knowledge distillation from a frozen teacher (hard + soft loss)",
       scratch=(TRAIN_STATE,))
def kd_stage(model: nn.Module, cfg: KDConfig, ctx: StageContext) -> nn.Module:
    if cfg.student_stage is not None:
        student, ctx.spec, _ = load_model(ctx.stage_model_file(cfg.student_stage,
                                                               "student_stage"))
        ctx.notes.append(f"student {ctx.spec.arch} from stage {cfg.student_stage}")
    elif cfg.student is not None:
        # Seeded like a recipe's own model: the fresh student starts exactly where a recipe
        # that trains it without a teacher (same seed) starts, so the two compare fairly.
        student, ctx.spec = start_model(cfg.student, ctx.data, seed=ctx.seed)
        ctx.notes.append(f"student {ctx.spec.arch}" + (
            f" from {cfg.student.weights}" if cfg.student.weights else " (fresh)"))
    else:
        return run_training(model, cfg, ctx, teacher_loss(cfg, ctx, cfg))
    return run_training(student, cfg, ctx, teacher_loss(cfg, ctx, cfg, default=model))
