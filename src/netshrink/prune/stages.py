"""The ``prune.magnitude`` and ``prune.nm`` recipe stages."""

from __future__ import annotations

import json

from torch import nn

from netshrink.prune.magnitude import MagnitudePruneConfig, prune_magnitude
from netshrink.prune.masks import MaskHook, Masks, sparsity_table
from netshrink.prune.nm import NMPruneConfig, prune_nm
from netshrink.prune.resume import StepCheckpoints
from netshrink.recipe.stages import StageContext, stage
from netshrink.store.atomic import atomic_write_text


def record_sparsity(model: nn.Module, ctx: StageContext) -> None:
    """Write the per-layer sparsity table beside the stage's model and note the total."""
    rows = sparsity_table(model)
    atomic_write_text(ctx.stage_dir / "sparsity.json", json.dumps(rows, indent=2))
    total = rows[-1]
    ctx.notes.append(f"conv/linear sparsity {total['sparsity']:.4f} "
                     f"({total['zeros']:,} of {total['weights']:,} weights are zero)")


@stage("prune.magnitude", MagnitudePruneConfig,
       "unstructured L1-magnitude pruning, layer-wise or global, one-shot or iterative")
def magnitude_stage(model: nn.Module, cfg: MagnitudePruneConfig, ctx: StageContext) -> nn.Module:
    from netshrink.train.loop import train
    from netshrink.train.stages import FinetuneConfig

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
