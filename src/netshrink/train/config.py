"""Options of the one training loop (``train`` and ``finetune`` stages, ``netshrink train``)."""

from __future__ import annotations

import math
from typing import Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from netshrink.limits import MAX_SEED

# Mixed precision of a training loop (see ``TrainConfig.amp``); the compress search's
# fine-tunings take the same values.
AmpMode = Literal["auto", "native", "off", "bf16", "fp16"]


class TrainConfig(BaseModel):
    """How to train.

    Attributes:
        epochs: passes over the training split (> 0).
        max_steps: stop after this many optimizer steps (for quick runs), if set.
        optimizer: ``sgd`` (momentum, Nesterov) or ``adamw``.
        lr: peak learning rate, reached at the end of warm-up.
        momentum: SGD's momentum.
        nesterov: SGD with Nesterov momentum.
        weight_decay: applied to conv/linear weights only, never to BN or biases.
        batch_size: images per optimizer step.
        warmup_epochs: linear warm-up from lr/100 before the schedule.
        schedule: ``cosine`` decays to 0 by the last step; ``constant`` keeps lr.
        label_smoothing: cross-entropy label smoothing.
        amp: mixed precision; ``auto`` is bf16 autocast on CUDA and off on CPU (on a CPU
            without native bf16, an AVX2 one, autocast trains ResNets several times
            slower); ``native`` is bf16 autocast wherever the device computes bf16 natively
            (CUDA, and CPUs with AVX512-BF16 or AMX, as oneDNN reports them: a ResNet-50
            trained 1.31x and a ResNet-18 1.49x faster on a 2-core AVX512-BF16 EPYC) and
            off elsewhere, so a recipe asking for it runs unchanged on any CPU.
        channels_last: NHWC memory format (faster convs on CPU and tensor cores).
        grad_clip: clip the gradient norm to this, if set.
        eval_every: evaluate on the validation split every N epochs (0: never).
        checkpoint_minutes: save a resumable state at least this often within an epoch.
        keep_zeros: conv/linear weights that are exactly zero when training starts were
            pruned, and stay zero through every step (fine-tuning a pruned model).
        seed: initialisation of shuffling and augmentation.
        sync_bn: with several processes (``torchrun``), batch norm normalises with the
            statistics of the global batch, as one process would, instead of each rank's
            share alone (which changes the training); no effect in one process.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0)
    batch_size: int = Field(default=256, gt=0)
    warmup_epochs: float = Field(default=0.2, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    amp: AmpMode = "auto"
    channels_last: bool = True
    grad_clip: float | None = Field(default=None, gt=0)
    eval_every: int = Field(default=1, ge=0)
    checkpoint_minutes: float = Field(default=2.0, gt=0)
    keep_zeros: bool = True
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    sync_bn: bool = False

    @model_serializer(mode="wrap")
    def _without_default_sync_bn(self, handler: SerializerFunctionWrapHandler) -> dict:
        # Stage keys, resumable states and run records are made of this dump: configs
        # from before the option (or without it) keep the keys and files they had.
        data = handler(self)
        if isinstance(data, dict) and data.get("sync_bn") is False:
            del data["sync_bn"]
        return data


TrainConfigT = TypeVar("TrainConfigT", bound=TrainConfig)


def fit_batch_size(cfg: TrainConfigT, split: object) -> TrainConfigT:
    """``cfg`` with the batch size ``split`` gives where the split decides its batches
    itself (the user's ``DataLoader``: its ``own_batch_size``); unchanged for netshrink's
    splits, which batch as asked. The loop counts its steps per epoch, and so its
    schedule, by the batch size."""
    own = getattr(split, "own_batch_size", None)
    if isinstance(own, int) and own > 0 and own != cfg.batch_size:
        return cfg.model_copy(update={"batch_size": own})
    return cfg


def fractional_epochs(cfg: TrainConfig, epochs: float, n_train: int) -> TrainConfig:
    """``cfg`` made to train ``epochs`` passes, fractions allowed (0.5 = half the data).

    The loop counts whole epochs; a fraction becomes the next whole number of epochs
    capped by ``max_steps = ceil(epochs * steps per epoch)``, so a cosine schedule ends
    where the fraction does.
    """
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    steps = max(1, math.ceil(epochs * steps_per_epoch - 1e-9))
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    return cfg.model_copy(update={"epochs": max(1, math.ceil(epochs - 1e-9)), "max_steps": steps})
