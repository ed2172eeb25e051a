"""The ``quant.kmeans`` recipe stage: shared weights, optional centroid fine-tuning, a packed
file (bit-packed indices + codebooks + zero bitmask, zstd) as the model's size."""

from __future__ import annotations

from torch import nn

from netshrink.quant.kmeans import CodebookHook, KMeansConfig, kmeans_share
from netshrink.recipe.stages import Deployed, StageContext, stage
from netshrink.runtime import model_stats
from netshrink.store.packed import pack_model


@stage("quant.kmeans", KMeansConfig,
       "k-means weight sharing (2^bits values per layer, zeros kept), packed codebook file")
def kmeans_stage(model: nn.Module, cfg: KMeansConfig, ctx: StageContext) -> Deployed:
    codebooks = kmeans_share(model, bits=cfg.bits, include=cfg.include, exclude=cfg.exclude,
                             max_iter=cfg.max_iter)
    if cfg.finetune_epochs > 0:
        from netshrink.train.config import fractional_epochs
        from netshrink.train.loop import train
        from netshrink.train.stages import FinetuneConfig

        train_cfg = fractional_epochs(FinetuneConfig(lr=cfg.finetune_lr), cfg.finetune_epochs,
                                      len(ctx.data.train))
        result = train(model, ctx.data, train_cfg,
                       device=ctx.device, step_hooks=[CodebookHook(codebooks)],
                       progress=ctx.progress, log=ctx.log)
        ctx.history.extend(result.history)
    model = model.cpu().eval()
    path = ctx.stage_dir / "model.nspk"
    pack_model(model, ctx.spec, path, codebooks=codebooks)
    ctx.notes.append(f"{len(codebooks)} layers share at most {2 ** cfg.bits} values each; "
                     "the packed file stores bit-packed indices, codebooks and zero bitmasks, "
                     "zstd-coded, and reloads to these exact weights")
    return Deployed(file=path, runtime="torch", precision=f"fp32, {cfg.bits}-bit k-means",
                    stats=model_stats(model, ctx.input_shape), model=model)
