"""Depth pruning: whole residual blocks removed, the least harmful first.

Of netshrink's ResNets, a stage's blocks after its first have the identity as shortcut:
such a block computes ``relu(x + F(x))`` on an input ``x`` that is already non-negative,
so without it the stage passes ``x`` on unchanged in shape. Only the *last* block of a
stage is removed (a stage keeps at least one), so the model stays a ResNet with fewer
blocks per stage (``ModelSpec.blocks``) whose weights file reloads by name, and channel
pruning, INT8 and export work on it as on any other.

Of any other network, a residual block is a submodule that adds its own input to what it
computes (``x + F(x)``: MobileNetV2's and EfficientNet's inverted residuals with a skip,
ConvNeXt's blocks, RegNet's and ResNeXt's bottlenecks without a projection) and gives
out what it takes in, shape for shape: replaced by an identity, the network around it
runs unchanged. The outermost such module is the block (the names of those removed are
``ModelSpec.removed``, so the file reloads). Found by tracing each submodule's forward
with ``torch.fx``; a module that cannot be traced is not taken for a block. A network
with none (DenseNet's concatenations, VGG) is told so in one line.

Which block goes is decided by a scan on the validation split: each removable block is
removed alone from a copy and top-1 measured; the one whose removal costs least goes, and
the scan is repeated on what is left for the next (greedy, ``count`` times).

Why: at batch 1 on a CPU a small image's inference time is mostly per-layer work that
does not shrink with the channel count (kernel launches, memory passes); removing layers
is what cuts it, where channel pruning cuts FLOPs that batch-1 latency barely follows.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import fx, nn

from netshrink.bench.accuracy import evaluate
from netshrink.data.base import Split
from netshrink.errors import UserError
from netshrink.models.resnet import STAGE_NAMES, stage_blocks
from netshrink.prune.sensitivity import check_split

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines


class BlockPruneConfig(BaseModel):
    """Settings of depth pruning.

    Attributes:
        count: residual blocks to remove.
        blocks: remove exactly these (``layer4.1``; each the last block of its stage at
            the time it goes), in order, instead of scanning.
        scan_images: validation images each scan evaluates on.
    """

    model_config = ConfigDict(extra="forbid")

    count: int = Field(default=1, gt=0)
    blocks: list[str] | None = None
    scan_images: int = Field(default=1000, gt=0)


_ADDS = {operator.add, operator.iadd, torch.add}


def removable_blocks(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[str]:
    """The blocks that may go now: of netshrink's ResNets, the last of each stage that has
    more than one; of another network, every residual block (see the module docstring),
    found on one image of ``input_shape`` (``[C, H, W]``).

    Raises:
        UserError: another network and no ``input_shape``, or one with no residual block.
    """
    blocks = stage_blocks(model)
    if blocks is not None:
        return [f"{name}.{n - 1}" for name, n in zip(STAGE_NAMES, blocks, strict=True)
                if n > 1]
    if input_shape is None:
        raise UserError("depth pruning finds the residual blocks of this network on an "
                        "example image: give example_input= (or data=)")
    found = residual_blocks(model, input_shape)
    if not found:
        raise UserError(f"{type(model).__name__} has no residual block depth pruning could "
                        "remove (a submodule that adds its input to its output, shape for "
                        "shape); prune its channels instead (prune.channel)")
    return found


def residual_blocks(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """The outermost submodules of ``model`` that give out their input's shape and add
    their input to what they compute (``x + F(x)``), by name, in the model's order."""
    same: set[str] = set()
    names = {m: n for n, m in model.named_modules() if n}
    hooks = []

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        if (len(args) == 1 and isinstance(args[0], torch.Tensor)
                and isinstance(output, torch.Tensor) and args[0].shape == output.shape):
            same.add(names[module])

    for module in names:
        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(torch.zeros(1, *input_shape, dtype=next(model.parameters()).dtype))
            model.train(was)
    finally:
        for hook in hooks:
            hook.remove()
    found: list[str] = []
    for name, module in model.named_modules():
        if (name in same and not any(name.startswith(f"{f}.") for f in found)
                and any(isinstance(m, nn.Conv2d) for m in module.modules())
                and _adds_its_input(module)):
            found.append(name)
    return found


def _adds_its_input(module: nn.Module) -> bool:
    """``module``'s forward adds its input to something (a residual with an identity
    shortcut), as ``torch.fx`` traces it; False when it cannot be traced."""
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # the user's code may fail to trace in any way: not a known block
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    for node in graph.nodes:
        adds = ((node.op == "call_function" and node.target in _ADDS)
                or (node.op == "call_method" and node.target in ("add", "add_")))
        if adds and inputs[0] in node.args:
            return True
    return False


def remove_block(model: nn.Module, block: str, input_shape: Sequence[int] | None = None
                 ) -> None:
    """Remove ``block`` from ``model`` in place: of a ResNet, the last of its stage
    (``layer3.1``); of another network, a residual block replaced by an identity.

    Raises:
        UserError: it is not a block that may go (see ``removable_blocks``).
    """
    allowed = removable_blocks(model, input_shape)
    if block not in allowed:
        what = ("the last block of a stage with more than one" if stage_blocks(model)
                is not None else "a residual block")
        raise UserError(f"block {block!r} cannot be removed; removable now ({what}): "
                        f"{', '.join(allowed) or 'none'}")
    if stage_blocks(model) is None:
        model.set_submodule(block, nn.Identity())
        # kept on the module: saving the user's model with its factory then records it
        # (``models.custom_spec``), as a spec's ``removed`` does
        model.netshrink_removed = [*getattr(model, "netshrink_removed", []), block]
        return
    stage = block.split(".")[0]
    setattr(model, stage, getattr(model, stage)[:-1])


def block_scan(model: nn.Module, split: Split, *, max_images: int, device: str = "cpu",
               input_shape: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Top-1 on ``split`` with each removable block removed alone (a copy each); rows
    ``{block, top1, drop}``, the least harmful first, after a ``baseline`` row."""

    def top1(m: nn.Module) -> float:
        return evaluate(m, split, device=device, max_images=max_images,
                        split_name="val").top1

    base = top1(model)
    rows = []
    for block in removable_blocks(model, input_shape):
        trial = copy.deepcopy(model)
        remove_block(trial, block, input_shape)
        acc = top1(trial)
        rows.append({"block": block, "top1": acc, "drop": base - acc})
    rows.sort(key=lambda r: (r["drop"], r["block"]))
    return [{"block": "baseline", "top1": base, "drop": 0.0}, *rows]


def most_removable(model: nn.Module, input_shape: Sequence[int] | None) -> int:
    """How many blocks depth pruning may remove from ``model`` in all (0: none)."""
    blocks = stage_blocks(model)
    if blocks is not None:
        return sum(n - 1 for n in blocks)  # every stage keeps its first
    return len(residual_blocks(model, input_shape)) if input_shape is not None else 0


def prune_blocks(model: nn.Module, cfg: BlockPruneConfig, val: Split | None, *,
                 device: str = "cpu", log: Callable[[str], None] = LOG.info,
                 input_shape: Sequence[int] | None = None
                 ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``model`` with ``cfg.count`` blocks removed (or ``cfg.blocks``), and the
    removals made (with each scan's top-1 where scanned).

    Args:
        input_shape: one image ``[C, H, W]``: where the residual blocks of a network
            other than netshrink's ResNets are found.

    Raises:
        UserError: no residual blocks, too many blocks asked, a block that cannot go, or
            no validation images to scan on.
    """
    pruned = copy.deepcopy(model).eval()
    if cfg.blocks is not None:
        for block in cfg.blocks:
            remove_block(pruned, block, input_shape)
        return pruned, [{"block": b} for b in cfg.blocks]
    removable_blocks(pruned, input_shape)  # names a network without residual blocks
    most = most_removable(pruned, input_shape)
    if cfg.count > most:
        kept = " (every stage keeps its first)" if stage_blocks(pruned) is not None else ""
        raise UserError(f"prune.blocks count {cfg.count}: this network has {most} removable "
                        f"residual blocks{kept}")
    split = check_split(val, "val")
    removed: list[dict[str, Any]] = []
    for step in range(cfg.count):
        rows = block_scan(pruned, split, max_images=cfg.scan_images, device=device,
                          input_shape=input_shape)
        best = rows[1]
        log(f"block scan {step + 1}/{cfg.count} on {min(cfg.scan_images, len(split))} "
            "validation images: " + ", ".join(f"{r['block']} {r['top1']:.2%}" for r in rows)
            + f"; removing {best['block']}")
        remove_block(pruned, best["block"], input_shape)
        removed.append({**best, "baseline_top1": rows[0]["top1"]})
    return pruned, removed
