"""One epoch of training as every record keeps it (run.json, resumable states, the cache)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EpochRecord(BaseModel):
    """One epoch of a training stage."""

    model_config = ConfigDict(extra="forbid")

    epoch: int
    train_loss: float
    train_top1: float
    lr: float
    seconds: float
    val_top1: float | None = None
    val_top5: float | None = None
