"""Distillation settings shared by ``distill.kd``, ``finetune`` and ``quant.qat``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from netshrink.distill.losses import kd_loss_fn
from netshrink.recipe.stages import StageContext
from netshrink.store.checkpoint import load_model
from netshrink.train.config import TrainConfig

__all__ = ["DistillOptions", "TeacherFields", "teacher_loss"]


class TeacherFields(BaseModel):
    """Which teacher, and how its soft targets mix with the labels.

    Args:
        teacher: a model file (netshrink, safetensors or torchvision ``.pth``).
        teacher_stage: or an earlier stage of this recipe whose model teaches
            (``baseline`` is the model before any compression).
        alpha: weight of the hard-label cross-entropy; ``1 - alpha`` goes to the soft term.
        temperature: softening of both distributions (``T``).
    """

    model_config = ConfigDict(extra="forbid")

    teacher: Path | None = None
    teacher_stage: str | None = None
    alpha: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0)

    def _check_teacher(self, *, required: bool) -> None:
        if self.teacher is not None and self.teacher_stage is not None:
            raise ValueError("give one of teacher (a model file) or teacher_stage (the name "
                             "of an earlier stage), not both")
        if required and self.teacher is None and self.teacher_stage is None:
            raise ValueError("give exactly one of teacher (a model file) or teacher_stage "
                             "(the name of an earlier stage)")


class DistillOptions(TeacherFields):
    """The ``distill:`` option of fine-tuning and QAT: a teacher is required."""

    @model_validator(mode="after")
    def _one_teacher(self) -> DistillOptions:
        self._check_teacher(required=True)
        return self


def _teacher_file(opts: TeacherFields, ctx: StageContext) -> Path:
    if opts.teacher is not None:
        return opts.teacher
    assert opts.teacher_stage is not None
    return ctx.stage_model_file(opts.teacher_stage, "teacher_stage")


def teacher_loss(
    opts: TeacherFields | None, ctx: StageContext, train_cfg: TrainConfig,
    default: nn.Module | None = None,
) -> Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """Load the teacher (frozen, eval, on the stage's device) and return the loop's loss
    hook, with the training's label smoothing; None (plain cross-entropy) without ``opts``.

    ``default`` teaches when ``opts`` names no teacher (``distill.kd`` with a ``student``:
    the stage's input model).

    Raises:
        UserError: the teacher file is missing or unreadable, or no such earlier stage.
    """
    if opts is None:
        return None
    if opts.alpha == 1.0:
        # The soft term's weight is exactly zero: the loss is the plain cross-entropy, so
        # the teacher is not even run (the no-teacher baseline of a KD study costs no more
        # than plain training).
        ctx.notes.append("alpha 1: plain cross-entropy, the teacher is not used")
        return None
    if opts.teacher is None and opts.teacher_stage is None and default is not None:
        teacher, source = default, "the stage's input model"
    else:
        teacher = load_model(_teacher_file(opts, ctx))[0]
        source = str(opts.teacher or opts.teacher_stage)
    teacher = teacher.to(ctx.device)
    if train_cfg.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    ctx.notes.append(f"distilled (alpha {opts.alpha}, T {opts.temperature}) from {source}")
    return kd_loss_fn(teacher, alpha=opts.alpha, temperature=opts.temperature,
                      label_smoothing=train_cfg.label_smoothing)
