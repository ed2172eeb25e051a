"""Depth pruning: whole residual blocks removed from a ResNet, the least harmful first.

A stage's blocks after its first have the identity as shortcut: such a block computes
``relu(x + F(x))`` on an input ``x`` that is already non-negative, so without it the stage
passes ``x`` on unchanged in shape. Only the *last* block of a stage is removed (a stage
keeps at least one), so the model stays a ResNet with fewer blocks per stage
(``ModelSpec.blocks``) whose weights file reloads by name, and channel pruning, INT8 and
export work on it as on any other.

Which block goes is decided by a scan on the validation split: each removable block is
removed alone from a copy and top-1 measured; the one whose removal costs least goes, and
the scan is repeated on what is left for the next (greedy, ``count`` times).

Why: at batch 1 on a CPU a small image's inference time is mostly per-layer work that
does not shrink with the channel count (kernel launches, memory passes); removing layers
is what cuts it, where channel pruning cuts FLOPs that batch-1 latency barely follows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from netshrink.bench.accuracy import evaluate
from netshrink.data.base import Split
from netshrink.errors import UserError
from netshrink.models.resnet import STAGE_NAMES, stage_blocks
from netshrink.prune.sensitivity import check_split


class BlockPruneConfig(BaseModel):
    """Settings of depth pruning.

    Args:
        count: residual blocks to remove.
        blocks: remove exactly these (``layer4.1``; each the last block of its stage at
            the time it goes), in order, instead of scanning.
        scan_images: validation images each scan evaluates on.
    """

    model_config = ConfigDict(extra="forbid")

    count: int = Field(default=1, gt=0)
    blocks: list[str] | None = None
    scan_images: int = Field(default=1000, gt=0)


def removable_blocks(model: nn.Module) -> list[str]:
    """The blocks that may go now: the last of each stage that has more than one.

    Raises:
        UserError: not a ResNet (``layer1`` ... ``layer4`` of residual blocks).
    """
    blocks = stage_blocks(model)
    if blocks is None:
        raise UserError("prune.blocks removes residual blocks of a ResNet (stages layer1 to "
                        "layer4); this model has no such stages")
    return [f"{name}.{n - 1}" for name, n in zip(STAGE_NAMES, blocks, strict=True) if n > 1]


def remove_block(model: nn.Module, block: str) -> None:
    """Remove ``block`` (``layer3.1``), the last of its stage, from ``model`` in place.

    Raises:
        UserError: it is not a block that may go (see ``removable_blocks``).
    """
    allowed = removable_blocks(model)
    if block not in allowed:
        raise UserError(f"block {block!r} cannot be removed; removable now (the last block "
                        f"of a stage with more than one): {', '.join(allowed) or 'none'}")
    stage = block.split(".")[0]
    setattr(model, stage, getattr(model, stage)[:-1])


def block_scan(model: nn.Module, split: Split, *, max_images: int, device: str = "cpu"
               ) -> list[dict[str, Any]]:
    """Top-1 on ``split`` with each removable block removed alone (a copy each); rows
    ``{block, top1, drop}``, the least harmful first, after a ``baseline`` row."""

    def top1(m: nn.Module) -> float:
        return evaluate(m, split, device=device, max_images=max_images,
                        split_name="val").top1

    base = top1(model)
    rows = []
    for block in removable_blocks(model):
        trial = copy.deepcopy(model)
        remove_block(trial, block)
        acc = top1(trial)
        rows.append({"block": block, "top1": acc, "drop": base - acc})
    rows.sort(key=lambda r: (r["drop"], r["block"]))
    return [{"block": "baseline", "top1": base, "drop": 0.0}, *rows]


def prune_blocks(model: nn.Module, cfg: BlockPruneConfig, val: Split | None, *,
                 device: str = "cpu", log: Callable[[str], None] = print
                 ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``model`` with ``cfg.count`` blocks removed (or ``cfg.blocks``), and the
    removals made (with each scan's top-1 where scanned).

    Raises:
        UserError: not a ResNet, too many blocks asked, a block that cannot go, or no
            validation images to scan on.
    """
    pruned = copy.deepcopy(model).eval()
    if cfg.blocks is not None:
        for block in cfg.blocks:
            remove_block(pruned, block)
        return pruned, [{"block": b} for b in cfg.blocks]
    most = sum(n - 1 for n in stage_blocks(pruned) or [])
    if cfg.count > most:
        removable_blocks(pruned)  # names a network that is not a ResNet
        raise UserError(f"prune.blocks count {cfg.count}: this ResNet has {most} removable "
                        "blocks (every stage keeps its first)")
    split = check_split(val, "val")
    removed: list[dict[str, Any]] = []
    for step in range(cfg.count):
        rows = block_scan(pruned, split, max_images=cfg.scan_images, device=device)
        best = rows[1]
        log(f"block scan {step + 1}/{cfg.count} on {min(cfg.scan_images, len(split))} "
            "validation images: " + ", ".join(f"{r['block']} {r['top1']:.2%}" for r in rows)
            + f"; removing {best['block']}")
        remove_block(pruned, best["block"])
        removed.append({**best, "baseline_top1": rows[0]["top1"]})
    return pruned, removed
