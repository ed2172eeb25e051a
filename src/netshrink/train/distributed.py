"""Data-parallel training under ``torchrun``: the process group, each rank's share of a
batch, batch norm over the global batch, and rank 0 leading the other ranks.

``torchrun --nproc_per_node N`` starts N copies of the command with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` set. Without them (or with ``WORLD_SIZE=1``) nothing here
does anything: one process trains exactly as it always did, with no process group.

Two ways to run with several ranks:

* Every rank runs the same code (a user's script calling ``netshrink.train_model``):
  each training-loop call is collective, and only rank 0 logs and writes states.
* Rank 0 leads (recipes and the command line, ``run_recipe``): rank 0 alone runs the
  recipe, so pruning, calibration, quantization, export, measurement and every write to
  the run folder or the model cache happen once. Each time it enters the training loop
  it first sends that call (model, data, config, loss, step hooks, state file) to the
  other ranks, which do nothing but wait for such calls (``follow``) and train with
  rank 0. They end with rank 0's result once it says it is done.
"""

from __future__ import annotations

import datetime
import io
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from netshrink.data import Split, shard_rows
from netshrink.errors import UserError

__all__ = ["GlobalBatchNorm2d", "World", "announce_training", "broadcast_module", "check_same",
           "current", "follow", "global_batch_norm", "init", "launched", "leading",
           "rank_batches", "sum_across", "wait_for_leader", "wrap"]

# Rank 0 may measure, export or analyse for a long while between two trainings, while
# the other ranks wait for its next message: far longer than torch's default timeouts.
LEADER_WAIT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class World:
    """How many processes train together, and which one this is."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"${name}={text!r} is not a whole number; launch with torchrun "
                        "(which sets it) or unset it") from None


def launched() -> World:
    """The world ``torchrun`` describes in the environment; size 1 without it."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < size:
        raise UserError(f"$RANK={rank} is outside $WORLD_SIZE={size}; launch with torchrun")
    return World(size=size, rank=rank, local_rank=local_rank)


def current() -> World:
    """The world of the process group if one is running (ours or the caller's), else the
    environment's."""
    if dist.is_available() and dist.is_initialized():
        env = launched()
        return World(size=dist.get_world_size(), rank=dist.get_rank(),
                     local_rank=env.local_rank if env.parallel else dist.get_rank())
    return launched()


_CONTROL: list[Any] = []  # the gloo group rank 0's messages travel on, once made


def init(device: str = "cpu") -> World:
    """Start the process group once, if ``torchrun`` launched several processes: gloo on
    CPUs, NCCL on GPUs (each rank on the GPU ``LOCAL_RANK``). A group the caller started
    is used as it is. Returns the world (size 1: nothing was started).

    Raises:
        UserError: torch has no distributed support, or a rank has no GPU of its own.
    """
    world = current()
    if not world.parallel:
        return world
    if not dist.is_available():
        raise UserError("torchrun started several processes but this torch has no "
                        "torch.distributed; install a torch build with it or run one process")
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        if cuda:
            count = torch.cuda.device_count()
            if world.local_rank >= count:
                raise UserError(f"LOCAL_RANK {world.local_rank} has no GPU of its own ({count} "
                                f"visible); start at most {count} processes per machine "
                                "(--nproc_per_node)")
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    elif cuda and torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    if not _CONTROL:
        # Messages and waits go through a gloo group of their own: CPU objects, and a
        # timeout long enough for rank 0's work between trainings (NCCL's is minutes).
        _CONTROL.append(dist.new_group(backend="gloo", timeout=LEADER_WAIT))
    return world


def _control() -> Any:
    if not _CONTROL:
        raise RuntimeError("netshrink.train.distributed.init() was not called")
    return _CONTROL[0]


# ------------------------------------------------------------------ each rank's share


Share = tuple[Tensor, Tensor, int]  # this rank's images, labels, and the global batch size


def rank_batches(split: Split, batch_size: int, *, seed: int, world: World) -> Iterator[Share]:
    """The shuffled, augmented training batches, each cut into the ranks' shares.

    The global batches are exactly those one process gets (the same seeded order and
    augmentation), so N ranks together take the steps one process takes. Splits with a
    ``shard_batches`` method load only their share; any other split is loaded whole by
    every rank and cut.
    """
    if not world.parallel:
        for x, y in split.batches(batch_size, shuffle=True, augment=True, seed=seed):
            yield x, y, len(y)
        return
    sharded = getattr(split, "shard_batches", None)
    if sharded is not None:
        yield from sharded(batch_size, rank=world.rank, size=world.size, shuffle=True,
                           augment=True, seed=seed)
        return
    for x, y in split.batches(batch_size, shuffle=True, augment=True, seed=seed):
        rows = shard_rows(len(y), world.rank, world.size)
        yield x[rows], y[rows], len(y)


# ------------------------------------------------------------------ batch norm


class _SumAcross(torch.autograd.Function):
    """The sum over the ranks, differentiable: each rank's input feeds every rank's
    output, so the gradient of each input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the global batch (every
    rank's share), so data-parallel training normalises as one process does.

    torch's ``SyncBatchNorm`` does this on GPUs only; this works with gloo on CPUs as
    well. The mean and variance are summed across ranks with a differentiable
    all-reduce (two passes, float64 sums: the variance matches one process's to float
    rounding), so the gradient flows to every rank's images as in one process.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average, as BatchNorm2d's
                factor = 1.0 / float(self.num_batches_tracked)
        xf = x.float()
        dims = (0, 2, 3)
        count = torch.full((1,), float(x.numel() // max(1, x.shape[1])), dtype=torch.float64,
                           device=x.device)
        total = _SumAcross.apply(torch.cat([xf.sum(dims, dtype=torch.float64), count]))
        n = total[-1]
        mean = total[:-1] / n
        centered = xf - mean.float().view(1, -1, 1, 1)
        var = _SumAcross.apply(centered.pow(2).sum(dims, dtype=torch.float64)) / n
        out = centered * torch.rsqrt(var + self.eps).float().view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var * (n / torch.clamp(n - 1, min=1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype),
                                                        alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype),
                                                       alpha=factor)
        return out.to(x.dtype)


@contextmanager
def global_batch_norm(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, ``model``'s ``BatchNorm2d`` layers use the global batch's
    statistics (when ``enabled`` and several ranks train).

    The layers change class in place, and back on leaving: the same parameter and buffer
    objects (the optimizer's), the same state dict, and a plain ``BatchNorm2d`` again
    for whatever saves, folds or exports the model afterwards.
    """
    layers = [m for m in model.modules() if type(m) is nn.BatchNorm2d] if enabled else []
    for layer in layers:
        layer.__class__ = GlobalBatchNorm2d
    try:
        yield
    finally:
        for layer in layers:
            layer.__class__ = nn.BatchNorm2d


# ------------------------------------------------------------------ collectives


def sum_across(*values: Tensor) -> list[Tensor]:
    """Each value summed over the ranks (float64, on the values' device)."""
    stacked = torch.stack([v.to(torch.float64).reshape(()) for v in values])
    dist.all_reduce(stacked)
    return list(stacked.unbind())


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (construction gives every rank rank 0's
    weights and buffers)."""
    from torch.nn.parallel import DistributedDataParallel

    # A 1x1 kernel's gradient comes in either layout (the same memory for a 1x1 kernel);
    # DDP copies a gradient whose strides differ from its bucket's, and warns once.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(model, device_ids=ids)


def broadcast_module(model: nn.Module) -> None:
    """Every rank's parameters and buffers become rank 0's (in place)."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def wait_for_leader() -> None:
    """Wait until every rank is here, for as long as rank 0's own work takes."""
    dist.barrier(group=_control())


def check_same(value: int, what: str) -> None:
    """Raise on every rank unless all ranks hold the same ``value``.

    Raises:
        UserError: the ranks differ (named by ``what``).
    """
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_control())
    if len(set(values)) > 1:
        raise UserError(f"the ranks disagree on {what} ({values}); the files rank 0 writes "
                        "must be readable by every rank: run on one machine or a shared folder")


# ------------------------------------------------------------------ rank 0 leads


def _send(message: object) -> None:
    buffer = io.BytesIO()
    try:
        torch.save(message, buffer)
    except Exception as exc:  # pickling: a lambda or local function in a hook or loss
        raise UserError(f"data-parallel training sends the model, loss and step hooks to "
                        f"the other ranks, and this one cannot be pickled ({exc}); use "
                        "module-level classes or functions, or run one process") from None
    dist.broadcast_object_list([buffer.getvalue()], src=0, group=_control())


def _receive() -> Any:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=_control())
    # Not a file: rank 0 of this same job pickled its own model, loss and hooks a moment
    # ago (broadcast_object_list itself unpickles whatever rank 0 sends). weights_only
    # cannot rebuild a loss or hook object, so the full loader is the only one that works.
    return torch.load(io.BytesIO(box[0]), map_location="cpu", weights_only=False)


@dataclass
class _Leader:
    """Rank 0's side while it leads: the data it has sent (by identity) and whether the
    ranks are training together now (an error then stops every rank by itself)."""

    data: dict[int, tuple[object, int]] = field(default_factory=dict)
    training: bool = False
    result: Any = None


_LEADER: list[_Leader] = []


@contextmanager
def leading(world: World) -> Iterator[_Leader]:
    """Rank 0 leads the other ranks within the block (see the module docstring); set
    ``result`` on what it yields to hand the other ranks a result. Nothing happens with
    a single process.

    On leaving, the other ranks are told to stop: with the result, or (rank 0 raised
    outside a training) that it failed, so they exit instead of waiting.
    """
    leader = _Leader()
    if not (world.parallel and world.leader):
        yield leader
        return
    _LEADER.append(leader)
    try:
        yield leader
    except BaseException:
        if not leader.training:
            _send(("failed", None))
        raise
    finally:
        _LEADER.remove(leader)
    _send(("stop", leader.result))


def announce_training(call: dict[str, Any]) -> Callable[[], None]:
    """While rank 0 leads: send the other ranks this training-loop call (``train``'s
    keyword arguments). Returns what to call when the training has ended."""
    if not _LEADER:
        return lambda: None
    leader = _LEADER[-1]
    data = call["data"]
    known = leader.data.get(id(data))
    if known is None:
        # The data goes once per bundle (a recipe has one): later calls name it.
        known = leader.data[id(data)] = (data, len(leader.data))
        message = {**call, "data": data, "data_token": known[1]}
    else:
        message = {**call, "data": None, "data_token": known[1]}
    _send(("train", message))
    leader.training = True

    def ended() -> None:
        leader.training = False

    return ended


def follow(run: Callable[..., object]) -> Any:
    """A non-zero rank while rank 0 leads: ``run(**call)`` for each training call rank 0
    announces; returns rank 0's result when it stops.

    Raises:
        UserError: rank 0 failed (its error is in its own output).
    """
    data: dict[int, object] = {}
    while True:
        kind, message = _receive()
        if kind == "stop":
            return message
        if kind == "failed":
            raise UserError("rank 0 stopped with an error (shown in its output); fix it and "
                            "run the same command again to resume")
        token = message.pop("data_token")
        if message["data"] is not None:
            data[token] = message["data"]
        message["data"] = data[token]
        run(**message)
