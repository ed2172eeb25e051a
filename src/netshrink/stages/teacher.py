"""The teacher of a distilling stage (``distill.kd``, ``finetune``/``quant.qat`` with
``distill:``): a model file or an earlier stage's model, frozen, as the loop's loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from netshrink.distill.losses import kd_loss_fn
from netshrink.distill.options import TeacherFields
from netshrink.stages.base import StageContext
from netshrink.store.checkpoint import load_model
from netshrink.train.config import TrainConfig

__all__ = ["teacher_loss"]


def _teacher(opts: TeacherFields, ctx: StageContext) -> nn.Module:
    """The teacher ``opts`` names: a file, a model the context holds in memory, or an
    earlier stage's model file."""
    if opts.teacher is not None:
        return load_model(opts.teacher)[0]
    assert opts.teacher_stage is not None
    if opts.teacher_stage in ctx.models:
        return ctx.models[opts.teacher_stage]
    return load_model(ctx.stage_model_file(opts.teacher_stage, "teacher_stage"))[0]


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
        teacher = _teacher(opts, ctx)
        source = str(opts.teacher or opts.teacher_stage)
    teacher = teacher.to(ctx.device)
    if train_cfg.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    ctx.notes.append(f"distilled (alpha {opts.alpha}, T {opts.temperature}) from {source}")
    return kd_loss_fn(teacher, alpha=opts.alpha, temperature=opts.temperature,
                      label_smoothing=train_cfg.label_smoothing)
