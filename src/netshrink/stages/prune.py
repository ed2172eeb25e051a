"""The pruning stages: ``prune.magnitude``, ``prune.nm``, ``prune.channel`` and
``prune.blocks``.

``prune.channel``'s model has other layer widths than the spec builds, so the stage marks
the spec ``pruned``; the model file then reloads by resizing each layer to the stored
tensors. ``prune.blocks``'s model has fewer residual blocks: the spec records how many
each stage keeps.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from netshrink.bench import count_macs, count_params
from netshrink.models import ModelSpec
from netshrink.models.resnet import stage_blocks
from netshrink.prune.blocks import BlockPruneConfig, prune_blocks
from netshrink.prune.channel import ChannelPruneConfig, channel_report, prune_channels
from netshrink.prune.magnitude import MagnitudePruneConfig, prune_magnitude
from netshrink.prune.nm import NMPruneConfig, prune_nm
from netshrink.prune.resume import STEP_FILES, StepCheckpoints
from netshrink.stages.base import StageContext, stage
from netshrink.stages.train import FinetuneConfig
from netshrink.store.atomic import atomic_write_text
from netshrink.train.loop import train
from netshrink.train.masks import MaskHook, Masks, sparsity_table


def _changed(ctx: StageContext, **update: Any) -> ModelSpec | None:
    """The context's spec with ``update`` (None stays None: nothing rebuilds the model)."""
    return ctx.spec.model_copy(update=update) if ctx.spec is not None else None


def record_sparsity(model: nn.Module, ctx: StageContext) -> None:
    """Write the per-layer sparsity table beside the stage's model and note the total."""
    rows = sparsity_table(model)
    atomic_write_text(ctx.stage_dir / "sparsity.json", json.dumps(rows, indent=2))
    total = rows[-1]
    ctx.notes.append(f"conv/linear sparsity {total['sparsity']:.4f} "
                     f"({total['zeros']:,} of {total['weights']:,} weights are zero)")


@stage("prune.magnitude", MagnitudePruneConfig,
       "unstructured L1-magnitude pruning, layer-wise or global, one-shot or iterative",
       scratch=(STEP_FILES,))
def magnitude_stage(model: nn.Module, cfg: MagnitudePruneConfig, ctx: StageContext) -> nn.Module:

    steps = StepCheckpoints(ctx.stage_dir, ctx.key, ctx.spec, history=ctx.history)

    def finetune(m: nn.Module, masks: Masks) -> None:
        result = train(m, ctx.data, FinetuneConfig(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr),
                       device=ctx.device, step_hooks=[MaskHook(masks)], progress=ctx.progress,
                       log=ctx.log, state_path=steps.train_state(),
                       fingerprint_extra=f"{ctx.key}:{steps.current}")
        ctx.history.extend(result.history)

    pruned, _ = prune_magnitude(model, cfg, train_fn=finetune, steps=steps, log=ctx.log)
    record_sparsity(pruned, ctx)
    return pruned


@stage("prune.nm", NMPruneConfig, "N:M semi-structured sparsity (2:4) for sparse tensor cores")
def nm_stage(model: nn.Module, cfg: NMPruneConfig, ctx: StageContext) -> nn.Module:
    pruned, _, skipped = prune_nm(model, cfg)
    if skipped:
        ctx.notes.append(f"left dense (input channels not a multiple of {cfg.m}): "
                         + ", ".join(skipped))
    ctx.notes.append(f"{cfg.n}:{cfg.m} sparsity runs no faster on a CPU: the zeros are still "
                     "multiplied; sparse tensor cores (NVIDIA Ampere and later) use it")
    record_sparsity(pruned, ctx)
    return pruned


@stage("prune.channel", ChannelPruneConfig,
       "structured pruning: remove whole conv channels (L1/L2/BN-scale/Taylor), "
       "residual-safe; a smaller, faster dense model", scratch=(STEP_FILES,))
def channel_stage(model: nn.Module, cfg: ChannelPruneConfig, ctx: StageContext) -> nn.Module:
    shape = ctx.input_shape
    # Finished steps are kept with a pruned spec: their widths come from the weights.
    steps = StepCheckpoints(ctx.stage_dir, ctx.key, _changed(ctx, pruned=True),
                            history=ctx.history)

    def finetune(m: nn.Module) -> None:
        result = train(m, ctx.data, FinetuneConfig(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr),
                       device=ctx.device, progress=ctx.progress, log=ctx.log,
                       state_path=steps.train_state(),
                       fingerprint_extra=f"{ctx.key}:{steps.current}")
        ctx.history.extend(result.history)

    pruned = prune_channels(
        model, cfg, example_input=torch.zeros(1, *shape), data=ctx.data, device=ctx.device,
        train_fn=finetune if cfg.finetune_epochs > 0 else None, steps=steps, log=ctx.log,
    )
    atomic_write_text(ctx.stage_dir / "channels.json",
                      json.dumps(channel_report(model, pruned), indent=2))
    params = count_params(model)[0], count_params(pruned)[0]
    macs = count_macs(model, shape), count_macs(pruned, shape)
    ctx.notes.append(
        f"channels pruned ({cfg.importance}, {cfg.scope}, ratio {cfg.ratio:g}): "
        f"params {params[0]:,} → {params[1]:,} ({params[0] / params[1]:.2f}x fewer), "
        f"MACs {macs[0]:,} → {macs[1]:,} ({macs[0] / max(1, macs[1]):.2f}x fewer)"
    )
    # The runner saves the model with ctx.spec: pruned widths come from the weights file.
    ctx.spec = _changed(ctx, pruned=True)
    return pruned


@stage("prune.blocks", BlockPruneConfig,
       "depth pruning: remove whole residual blocks (x + F(x)), the least harmful first "
       "(a scan on the validation split); fewer layers, lower batch-1 latency")
def blocks_stage(model: nn.Module, cfg: BlockPruneConfig, ctx: StageContext) -> nn.Module:
    shape = ctx.input_shape if ctx.shape_known else None  # a ResNet's blocks need none
    pruned, removed = prune_blocks(model, cfg, ctx.data.val, device=ctx.device, log=ctx.log,
                                   input_shape=shape)
    atomic_write_text(ctx.stage_dir / "blocks.json", json.dumps(removed, indent=2))
    params = count_params(model)[0], count_params(pruned)[0]
    kept = stage_blocks(pruned)
    names = [r["block"] for r in removed]
    macs = ""
    if ctx.shape_known:  # naming the blocks needs no image (the Python API may give none)
        before, after = (count_macs(m, ctx.input_shape) for m in (model, pruned))
        macs = f", MACs {before:,} → {after:,}"
    ctx.notes.append(
        f"residual blocks removed: {', '.join(names)}"
        + (f" (blocks per stage now {kept})" if kept is not None else "")
        + f"; params {params[0]:,} → {params[1]:,}{macs}")
    # the runner saves the model with ctx.spec: which blocks a rebuild leaves out
    ctx.spec = (_changed(ctx, blocks=kept) if kept is not None or ctx.spec is None
                else _changed(ctx, removed=[*ctx.spec.removed, *names]))
    return pruned
