"""A resumable training state in one safetensors file (no pickle).

Tensors: the model's state dict (``model.*``), the optimizer's per-parameter buffers
(``opt.<index>.<name>``) and the torch RNG state. JSON header: where in the schedule we
are, the optimizer's hyper-parameters, the history so far, and a fingerprint of the
training config so a state is never resumed into a different run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from netshrink.store.atomic import atomic_write_bytes
from netshrink.train.history import EpochRecord


@dataclass
class Position:
    """Where training stands: ``batch`` batches of ``epoch`` done, ``step`` steps in all."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0


def save_state(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    position: Position,
    fingerprint: str,
) -> None:
    """Write the state atomically: an interruption leaves the previous state intact."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone()
               for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, buffers in opt["state"].items():
        for name, value in buffers.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    header = {
        "fingerprint": fingerprint,
        "position": json.dumps({
            "epoch": position.epoch, "batch": position.batch, "step": position.step,
            "seconds": position.seconds,
            "history": [h.model_dump() for h in position.history],
        }),
        "param_groups": json.dumps(opt["param_groups"]),
        "opt_scalars": json.dumps(scalars),
    }
    atomic_write_bytes(path, save(tensors, metadata=header))


def load_state(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    fingerprint: str,
) -> Position | None:
    """Restore a state written by ``save_state``; None when absent or from another run."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("fingerprint") != fingerprint:
        return None
    tensors = load_file(str(path))
    model.load_state_dict(
        {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True
    )
    state: dict[int, dict[str, Any]] = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            param = params[int(pid)] if int(pid) < len(params) else None
            if param is not None and value.shape == param.shape:
                # The buffer in its parameter's memory layout (channels_last is saved
                # contiguous): fused optimizer kernels walk both as one flat array.
                value = torch.empty_like(param).copy_(value)
            state.setdefault(int(pid), {})[name] = value
    for pid, extra in json.loads(header["opt_scalars"]).items():
        state.setdefault(int(pid), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(header["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    pos = json.loads(header["position"])
    return Position(
        epoch=pos["epoch"], batch=pos["batch"], step=pos["step"], seconds=pos["seconds"],
        history=[EpochRecord.model_validate(h) for h in pos["history"]],
    )
