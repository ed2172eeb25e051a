"""Distillation settings shared by ``distill.kd``, ``finetune`` and ``quant.qat``."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DistillOptions", "TeacherFields"]


class TeacherFields(BaseModel):
    """Which teacher, and how its soft targets mix with the labels.

    Attributes:
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
