"""The one training loop: training, fine-tuning, and later distillation and QAT use it.

Those later methods plug in through two hooks rather than loops of their own:
``loss_fn(model, images, labels) -> (loss, logits)`` (distillation swaps the loss) and
``step_hooks`` called after every optimizer step (pruning re-applies its masks there).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from netshrink.data import DataBundle
from netshrink.errors import UserError
from netshrink.train.config import TrainConfig
from netshrink.train.history import EpochRecord
from netshrink.train.masks import MaskHook, zero_masks
from netshrink.train.state import Position, load_state, save_state

LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]
StepHook = Callable[[nn.Module], None]


@dataclass
class TrainResult:
    history: list[EpochRecord]
    steps: int
    seconds: float
    resumed: bool


def cross_entropy_loss(label_smoothing: float) -> LossFn:
    def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits

    return loss_fn


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW with weight decay on conv/linear weights only.

    Decaying BN scales and biases only hurts (they set scale, not capacity).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up from 1/100, then the schedule."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _autocast(cfg: TrainConfig, device: torch.device):
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return nullcontext(), None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return torch.autocast(device.type, dtype=dtype), scaler


def fingerprint(cfg: TrainConfig, model: nn.Module, extra: str = "") -> str:
    """Identifies a training run, so a saved state resumes only into the same one."""
    shapes = ",".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha256((cfg.model_dump_json() + shapes + extra).encode()).hexdigest()[:16]


def train(
    model: nn.Module,
    data: DataBundle,
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    state_path: Path | None = None,
    loss_fn: LossFn | None = None,
    step_hooks: Sequence[StepHook] = (),
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    fingerprint_extra: str = "",
) -> TrainResult:
    """Train ``model`` in place on ``data.train``; evaluate on ``data.val`` each epoch.

    Args:
        model: trained in place (callers pass their own copy).
        data: the splits; ``val`` may be None.
        cfg: optimizer, schedule and loop options.
        device: ``cpu`` or ``cuda``.
        state_path: where to keep a resumable state; if one from the same run exists,
            training resumes from it. Deleted by the caller once the stage is saved.
        loss_fn: ``(model, x, y) -> (loss, logits)``; cross-entropy by default.
        step_hooks: called with the model after every optimizer step.
        progress: show a progress bar (default: only on a terminal).
        log: where one line per epoch goes.
        fingerprint_extra: anything else that must match for a state to resume.

    Returns:
        The per-epoch history, the steps taken, seconds spent (across resumes).
    """
    from netshrink.bench import evaluate  # late: bench imports models, not train

    dev = torch.device(device)
    if dev.type == "cuda":
        # Every batch has the same shape (but the last): let cuDNN pick its fastest
        # convolution algorithms once instead of using its heuristics every step.
        torch.backends.cudnn.benchmark = True
    model.to(dev)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    if cfg.keep_zeros:
        masks = zero_masks(model)  # before any resumed state: the zeros of the input model
        if masks:
            step_hooks = [MaskHook(masks), *step_hooks]
    optimizer = make_optimizer(model, cfg)
    loss_fn = loss_fn or cross_entropy_loss(cfg.label_smoothing)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    autocast, scaler = _autocast(cfg, dev)
    key = fingerprint(cfg, model, fingerprint_extra)

    pos = None
    if state_path is not None:
        pos = load_state(state_path, model=model, optimizer=optimizer, fingerprint=key)
    resumed = pos is not None
    pos = pos or Position()
    if resumed:
        log(f"resuming training at epoch {pos.epoch + 1}, batch {pos.batch}, step {pos.step}")
    if progress is None:
        progress = sys.stderr.isatty()

    def checkpoint(started: float) -> None:
        pos.seconds += time.perf_counter() - started
        if state_path is not None:
            save_state(state_path, model=model, optimizer=optimizer, position=pos,
                       fingerprint=key)

    model.train()
    while pos.step < total and pos.epoch < cfg.epochs:
        epoch_start = time.perf_counter()
        segment_start = epoch_start
        # Running sums stay on the device: reading them every step would make the CPU wait
        # for the GPU each step instead of queueing the next one (float64, as Python sums).
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        seen = 0
        bar = tqdm(total=steps_per_epoch, initial=pos.batch, disable=not progress, leave=False,
                   desc=f"epoch {pos.epoch + 1}/{cfg.epochs}")
        batches = data.train.batches(cfg.batch_size, shuffle=True, augment=True,
                                     seed=cfg.seed * 100_003 + pos.epoch)
        for index, (x, y) in enumerate(batches):
            if index < pos.batch:  # resuming: the same seeded order, skip what was done
                continue
            x = x.to(dev, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(dev, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(pos.step, total=total, warmup=warmup,
                                                 schedule=cfg.schedule)
            with autocast:
                loss, logits = loss_fn(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            for hook in step_hooks:
                hook(model)
            pos.batch, pos.step = index + 1, pos.step + 1
            loss_sum += loss.detach().to(torch.float64) * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            bar.update(1)
            if progress and pos.batch % 20 == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}")
            if time.perf_counter() - segment_start > 60 * cfg.checkpoint_minutes:
                _check_finite(loss_sum, pos, cfg)  # never keep a diverged state to resume
                checkpoint(segment_start)
                segment_start = time.perf_counter()
            if pos.step >= total:
                break
        bar.close()
        _check_finite(loss_sum, pos, cfg)
        record = EpochRecord(
            epoch=pos.epoch + 1,
            train_loss=float(loss_sum) / max(1, seen),
            train_top1=int(correct) / max(1, seen),
            lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - epoch_start,
        )
        if data.val is not None and cfg.eval_every and (pos.epoch + 1) % cfg.eval_every == 0:
            acc = evaluate(model, data.val, batch_size=512, device=device, split_name="val")
            record.val_top1, record.val_top5 = acc.top1, acc.top5
            model.train()
        pos.history.append(record)
        pos.epoch, pos.batch = pos.epoch + 1, 0
        checkpoint(segment_start)
        val = f" val top-1 {record.val_top1:.4f}" if record.val_top1 is not None else ""
        log(f"epoch {record.epoch}/{cfg.epochs}: loss {record.train_loss:.4f} "
            f"train top-1 {record.train_top1:.4f}{val} ({record.seconds:.0f}s)")
    model.eval()
    model.to(memory_format=torch.contiguous_format)
    return TrainResult(history=pos.history, steps=pos.step, seconds=pos.seconds, resumed=resumed)


def _check_finite(loss_sum: torch.Tensor, pos: Position, cfg: TrainConfig) -> None:
    """Stop a diverged training (checked at epoch ends and checkpoints, not every step,
    which would make a GPU wait): its weights are NaN and saving them helps nobody.

    Raises:
        UserError: the running loss is inf or NaN.
    """
    if not math.isfinite(float(loss_sum)):
        raise UserError(
            f"training diverged: the loss became {float(loss_sum)} in epoch {pos.epoch + 1} "
            f"(by step {pos.step}) at lr {cfg.lr:g}; lower lr, add warm-up or set grad_clip")
