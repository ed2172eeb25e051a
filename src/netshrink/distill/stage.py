"""The ``distill.kd`` recipe stage: train the chain's model (the student) against a teacher."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, model_validator
from torch import nn

from netshrink.distill.losses import kd_loss_fn
from netshrink.errors import UserError
from netshrink.recipe.stages import StageContext, stage
from netshrink.store.checkpoint import load_model
from netshrink.train.config import TrainConfig


class KDConfig(TrainConfig):
    """Knowledge distillation: every training option, plus the teacher and the loss mix.

    Args:
        teacher: a model file (netshrink, safetensors or torchvision ``.pth``).
        teacher_stage: or the name of an earlier stage of this recipe whose model teaches.
        alpha: weight of the hard-label cross-entropy; ``1 - alpha`` goes to the soft term.
        temperature: softening of both distributions (``T``).
    """

    teacher: Path | None = None
    teacher_stage: str | None = None
    alpha: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0)

    @model_validator(mode="after")
    def _one_teacher(self) -> KDConfig:
        if (self.teacher is None) == (self.teacher_stage is None):
            raise ValueError("give exactly one of teacher (a model file) or teacher_stage "
                             "(the name of an earlier stage)")
        return self


def _teacher_file(cfg: KDConfig, ctx: StageContext) -> Path:
    if cfg.teacher is not None:
        return cfg.teacher
    here = int(ctx.stage_dir.name.split("-", 1)[0])
    pattern = f"[0-9][0-9]-{cfg.teacher_stage}/model.safetensors"
    hits = [p for p in sorted((ctx.run_dir / "stages").glob(pattern))
            if int(p.parent.name.split("-", 1)[0]) < here]
    if not hits:
        raise UserError(f"teacher_stage {cfg.teacher_stage!r}: no earlier stage of that name "
                        "saved a torch model; name a training stage that comes before this one")
    return hits[0]


@stage("distill.kd", KDConfig, "knowledge distillation from a frozen teacher (hard + soft loss)")
def kd_stage(model: nn.Module, cfg: KDConfig, ctx: StageContext) -> nn.Module:
    from netshrink.train.loop import train

    teacher, _, _ = load_model(_teacher_file(cfg, ctx))
    teacher = teacher.to(ctx.device)
    if cfg.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    train_cfg = TrainConfig(**cfg.model_dump(include=set(TrainConfig.model_fields)))
    result = train(model, ctx.data, train_cfg, device=ctx.device,
                   state_path=ctx.stage_dir / "train_state.safetensors",
                   loss_fn=kd_loss_fn(teacher, alpha=cfg.alpha, temperature=cfg.temperature,
                                      label_smoothing=cfg.label_smoothing),
                   progress=ctx.progress, log=ctx.log, fingerprint_extra=ctx.key)
    ctx.history.extend(result.history)
    ctx.notes.append(f"distilled (alpha {cfg.alpha}, T {cfg.temperature}) from "
                     f"{cfg.teacher or cfg.teacher_stage}")
    return model
