"""The one training loop: training, fine-tuning, and later distillation and QAT use it.

Those later methods plug in through two hooks rather than loops of their own:
``loss_fn(model, images, labels) -> (loss, logits)`` (distillation swaps the loss) and
``step_hooks`` called after every optimizer step (pruning re-applies its masks there).

Under ``torchrun`` (several processes) the loop trains data-parallel: the model wrapped
in ``DistributedDataParallel``, each rank a share of every global batch (the batches one
process takes), the loss scaled so the averaged gradient is the global batch's mean, the
epoch's figures summed over the ranks; rank 0 alone evaluates, logs and keeps the
resumable state (see ``netshrink.train.distributed``).
"""

from __future__ import annotations

import hashlib
import logging
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

from netshrink.bench import evaluate
from netshrink.data import DataBundle
from netshrink.errors import UserError
from netshrink.heartbeat import mark_progress
from netshrink.train import distributed
from netshrink.train.config import TrainConfig, fit_batch_size
from netshrink.train.history import EpochRecord
from netshrink.train.masks import MaskHook, zero_masks
from netshrink.train.state import Position, load_state, save_state

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]
# Without a progress bar (output to a file), a line this often within an epoch.
PROGRESS_LINE_SECONDS = 30.0
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
    # One fused kernel for all parameters where torch has one: on 2 CPU cores AdamW's
    # step over a ResNet-50 took 8.5 ms fused against 50 ms per-tensor (SGD 3.6 vs 5.8 ms
    # on a ResNet-18), the same update.
    devices = {p.device.type for p in model.parameters()}
    fused = True if devices and devices <= {"cpu", "cuda"} else None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up from 1/100, then the schedule."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (a GPU that torch says supports it; a CPU
    whose oneDNN has bf16 kernels: AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The 16-bit type a training loop with ``amp`` (``TrainConfig.amp``) computes in on
    ``device``; None for float32."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    elif amp == "native":
        amp = "bf16" if native_bf16(device) else "off"
    if amp == "off":
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _autocast(cfg: TrainConfig, device: torch.device):
    dtype = autocast_dtype(cfg.amp, device)
    if dtype is None:
        return nullcontext(), None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
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
    log: Callable[[str], None] = LOG.info,
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

    Under torchrun with several processes every rank calls this together (or rank 0
    does, leading: see ``netshrink.train.distributed``); ``cfg.batch_size`` is the
    global batch, and every rank ends with rank 0's weights.

    Returns:
        The per-epoch history, the steps taken, seconds spent (across resumes).

    Raises:
        UserError: the loss became inf or NaN (a diverged training saves nothing).
    """
    cfg = fit_batch_size(cfg, data.train)  # the user's DataLoader decides its own batches
    # While rank 0 leads a recipe, the other ranks run this same call (sent to them).
    ended = distributed.announce_training({
        "model": model, "data": data, "cfg": cfg, "device": device, "state_path": state_path,
        "loss_fn": loss_fn, "step_hooks": list(step_hooks),
        "fingerprint_extra": fingerprint_extra})
    world = distributed.init(device)
    if not world.leader:
        progress, log = False, _quiet
    with distributed.global_batch_norm(model, cfg.sync_bn and world.parallel):
        loop = _Loop(model, data, cfg, device=device, state_path=state_path, loss_fn=loss_fn,
                     step_hooks=step_hooks, log=log, fingerprint_extra=fingerprint_extra,
                     world=world)
        if loop.resumed:
            pos = loop.pos
            log(f"resuming training at epoch {pos.epoch + 1}, batch {pos.batch}, "
                f"step {pos.step}")
        model.train()
        while loop.pos.step < loop.total and loop.pos.epoch < cfg.epochs:
            loop.epoch(progress if progress is not None else sys.stderr.isatty())
        model.eval()
    model.to(memory_format=torch.contiguous_format)
    if world.parallel:
        # Each rank's last step left its own batch-norm statistics: all end as rank 0.
        distributed.broadcast_module(model)
    ended()
    pos = loop.pos
    return TrainResult(history=pos.history, steps=pos.step, seconds=pos.seconds,
                       resumed=loop.resumed)


def follow() -> object:
    """A non-zero rank while rank 0 leads a recipe: train whenever rank 0 trains (each
    call as rank 0 makes it); returns rank 0's result once it is done."""
    return distributed.follow(train)


def _quiet(_: str) -> None:
    """Where a non-zero rank's log lines go: rank 0 alone logs."""


class _Loop:
    """The state of one training: model, optimizer, schedule and where it stands."""

    def __init__(self, model: nn.Module, data: DataBundle, cfg: TrainConfig, *, device: str,
                 state_path: Path | None, loss_fn: LossFn | None,
                 step_hooks: Sequence[StepHook], log: Callable[[str], None],
                 fingerprint_extra: str, world: distributed.World) -> None:
        self.model, self.data, self.cfg, self.log = model, data, cfg, log
        self.world = world
        self.device, self.state_path = device, state_path
        self.dev = torch.device(device)
        if self.dev.type == "cuda":
            # Every batch has the same shape (but the last): let cuDNN pick its fastest
            # convolution algorithms once instead of using its heuristics every step.
            torch.backends.cudnn.benchmark = True
        model.to(self.dev)
        self.fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model.to(memory_format=self.fmt)
        if cfg.keep_zeros:
            masks = zero_masks(model)  # before any resumed state: the input model's zeros
            if masks:
                step_hooks = [MaskHook(masks), *step_hooks]
        self.step_hooks = step_hooks
        self.optimizer = make_optimizer(model, cfg)
        self.loss_fn = loss_fn or cross_entropy_loss(cfg.label_smoothing)
        self.steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
        total = cfg.epochs * self.steps_per_epoch
        self.total = min(total, cfg.max_steps) if cfg.max_steps is not None else total
        self.warmup = min(self.total, round(cfg.warmup_epochs * self.steps_per_epoch))
        self.autocast, self.scaler = _autocast(cfg, self.dev)
        self.key = fingerprint(cfg, model, fingerprint_extra)
        pos = None
        if state_path is not None:
            pos = load_state(state_path, model=model, optimizer=self.optimizer,
                             fingerprint=self.key)
        self.resumed = pos is not None
        self.pos = pos or Position()
        self.net: nn.Module = model
        if world.parallel:
            # Every rank read the state rank 0 wrote: a rank that found none (another
            # machine's disk) would train from elsewhere.
            distributed.check_same(self.pos.step, "the step training resumes at")
            self.net = distributed.wrap(model, self.dev)

    def checkpoint(self, started: float) -> None:
        """Add the time since ``started`` and keep a resumable state (rank 0 alone)."""
        self.pos.seconds += time.perf_counter() - started
        if self.state_path is not None and self.world.leader:
            save_state(self.state_path, model=self.model, optimizer=self.optimizer,
                       position=self.pos, fingerprint=self.key)

    def step(self, x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """One optimizer step on a batch of ``n`` images, of which ``x``/``y`` are this
        rank's share (all of it in one process); returns the share's loss and logits."""
        cfg, pos, optimizer = self.cfg, self.pos, self.optimizer
        x = x.to(self.dev, non_blocking=True).contiguous(memory_format=self.fmt)
        y = y.to(self.dev, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(pos.step, total=self.total, warmup=self.warmup,
                                             schedule=cfg.schedule)
        with self.autocast:
            if len(y) == 0:
                # A last batch smaller than the ranks left this one no image; it still
                # takes part in the gradient all-reduce, adding zeros.
                logits = self.net(x)
                loss = logits.sum() * 0.0
            else:
                loss, logits = self.loss_fn(self.net, x, y)
        optimizer.zero_grad(set_to_none=True)
        grad_loss = loss
        if self.world.parallel:
            # DDP averages the ranks' gradients; weighted by its share of the batch, the
            # average is the gradient of the global batch's mean loss, as in one process
            # (shares may differ by an image).
            grad_loss = loss * (len(y) * self.world.size / n)
        if self.scaler is not None:
            self.scaler.scale(grad_loss).backward()
            self.scaler.unscale_(optimizer)
        else:
            grad_loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        for hook in self.step_hooks:
            hook(self.model)
        return loss, logits

    def epoch(self, progress: bool) -> None:
        """Train one epoch (or what is left of it), evaluate, keep a state, log a line."""
        cfg, pos = self.cfg, self.pos
        epoch_start = time.perf_counter()
        segment_start = epoch_start
        # Running sums stay on the device: reading them every step would make the CPU wait
        # for the GPU each step instead of queueing the next one (float64, as Python sums).
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dev)
        correct = torch.zeros((), dtype=torch.int64, device=self.dev)
        seen = 0
        bar = tqdm(total=self.steps_per_epoch, initial=pos.batch, disable=not progress,
                   leave=False, desc=f"epoch {pos.epoch + 1}/{cfg.epochs}")
        last_line = epoch_start  # without a bar (a log file), a line every so often
        self.pos_at_epoch_start = pos.batch  # a resumed epoch times only its own steps
        batches = distributed.rank_batches(self.data.train, cfg.batch_size,
                                           seed=cfg.seed * 100_003 + pos.epoch, world=self.world)
        for index, (x, y, n) in enumerate(batches):
            if index < pos.batch:  # resuming: the same seeded order, skip what was done
                continue
            loss, logits = self.step(x, y, n)
            pos.batch, pos.step = index + 1, pos.step + 1
            loss_sum += loss.detach().to(torch.float64) * len(y)
            correct += (logits.detach().argmax(1) == y.to(self.dev)).sum()
            seen += len(y)
            bar.update(1)
            # A step is progress (a bar's, or a line within PROGRESS_LINE_SECONDS): no
            # heartbeat line between them.
            mark_progress()
            if progress and pos.batch % 20 == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}")
            if (self.world.leader
                    and time.perf_counter() - segment_start > 60 * cfg.checkpoint_minutes):
                _check_finite(loss_sum, pos, cfg)  # never keep a diverged state to resume
                self.checkpoint(segment_start)
                segment_start = time.perf_counter()
            if pos.step >= self.total:
                break
            elif not progress and self.world.leader and (
                    time.perf_counter() - last_line > PROGRESS_LINE_SECONDS):
                last_line = time.perf_counter()
                self._progress_line(index + 1, last_line - epoch_start, loss_sum, seen)
        bar.close()
        if self.world.parallel:  # the epoch's figures are the global batch's
            loss_sum, correct, total_seen = distributed.sum_across(
                loss_sum, correct, torch.tensor(seen, device=self.dev))
            seen = int(total_seen)
        _check_finite(loss_sum, pos, cfg)
        self.end_epoch(EpochRecord(
            epoch=pos.epoch + 1, train_loss=float(loss_sum) / max(1, seen),
            train_top1=int(correct) / max(1, seen), lr=self.optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - epoch_start), segment_start)

    def _progress_line(self, done: int, elapsed: float, loss_sum: torch.Tensor,
                       seen: int) -> None:
        """What a bar shows, as one line for a log file: where the epoch is, the running
        loss, and about how long the epoch and the stage have left."""
        steps = self.steps_per_epoch
        per_step = elapsed / max(1, done - self.pos_at_epoch_start)
        left = per_step * max(0, steps - done)
        epochs_after = self.cfg.epochs - self.pos.epoch - 1
        stage_left = left + per_step * steps * epochs_after
        self.log(f"epoch {self.pos.epoch + 1}/{self.cfg.epochs}: step {done}/{steps} "
                 f"({done / max(1, steps):.0%}), loss {float(loss_sum) / max(1, seen):.4f}, "
                 f"{_duration(elapsed)} in; about {_duration(left)} left in the epoch"
                 + (f", {_duration(stage_left)} in the stage" if epochs_after else ""))

    def end_epoch(self, record: EpochRecord, segment_start: float) -> None:
        """Evaluate on ``val`` when due, record the epoch, keep a state, log its line."""
        cfg, pos = self.cfg, self.pos
        if (self.world.leader and self.data.val is not None and cfg.eval_every
                and (pos.epoch + 1) % cfg.eval_every == 0):
            acc = evaluate(self.model, self.data.val, batch_size=512, device=self.device,
                           split_name="val")
            record.val_top1, record.val_top5 = acc.top1, acc.top5
            self.model.train()
        pos.history.append(record)
        pos.epoch, pos.batch = pos.epoch + 1, 0
        self.checkpoint(segment_start)
        if self.world.parallel:
            # The others wait for rank 0's evaluation and state here, not in the next
            # step's all-reduce (whose NCCL timeout is minutes).
            distributed.wait_for_leader()
        val = f" val top-1 {record.val_top1:.4f}" if record.val_top1 is not None else ""
        left = cfg.epochs - record.epoch
        eta = f"; about {_duration(record.seconds * left)} left" if left > 0 else ""
        self.log(f"epoch {record.epoch}/{cfg.epochs}: loss {record.train_loss:.4f} "
                 f"train top-1 {record.train_top1:.4f}{val} ({record.seconds:.0f}s{eta})")


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


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
