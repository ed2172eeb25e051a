"""The ``compress`` recipe stage: the search of ``netshrink compress`` on the chain's
model, inside a recipe (``distill.kd -> compress`` in one file, resumable with it).

It registers through the ``netshrink.stages`` entry point (pyproject.toml), not by an
import from the recipe layer: the search runs recipes itself, so the recipe layer must
not import it.
"""

from __future__ import annotations

from torch import nn

from netshrink.compress.options import CompressConfig, held_out_split
from netshrink.compress.search import CHOSEN_DIR, make_search
from netshrink.errors import UserError
from netshrink.runtime.base import ModelStats
from netshrink.stages.base import Deployed, StageContext, stage
from netshrink.stages.start import section_of
from netshrink.store.checkpoint import save_model

SEARCH_DIR = "search"  # the search's folder inside the stage's: candidates, store, report
INPUT_FILE = "input.safetensors"  # the chain's model, the candidates' starting weights


@stage("compress", CompressConfig,
       "search channel pruning, sparsity, k-means or INT8 for the smallest (or fastest) "
       "file within an accuracy budget", chains=False)
def compress_stage(model: nn.Module, cfg: CompressConfig, ctx: StageContext) -> Deployed:
    source = ctx.stage_dir / INPUT_FILE
    save_model(model, ctx.spec, source, meta=ctx.meta)
    section = section_of(ctx.spec, source)
    data = {k: v for k, v in ctx.data_config.items() if k not in ("val_size", "calib_size")}
    split = ctx.meta.get("split") or {}
    cfg, notes = held_out_split(cfg, data, split)
    if split.get("val_size"):
        # the recipe's split: images its own training stages never used (a model it
        # loaded from a file may have seen them; only that file's run can tell)
        notes = [f"deciding on the recipe's validation split ({split['val_size']:,} images "
                 "held out of its training stages)"]
    result = make_search(section, data, cfg, ctx.stage_dir / SEARCH_DIR, device=ctx.device,
                    log=lambda line: ctx.log(f"  {line}"), notes=notes).run()
    deployed = result.deploy_stage
    if result.chosen is None or deployed is None or deployed.artifact is None:
        raise UserError(f"compress: no candidate stays within {cfg.budget_points:g} points "
                        f"of top-1 (see {ctx.stage_dir / SEARCH_DIR / 'report.md'}); raise "
                        "budget_points or add smaller channel_ratios / sparsities")
    m = deployed.measurement
    assert m is not None  # the chosen run measured its last stage
    ctx.notes += [*notes, f"chosen {result.chosen.candidate.name} of {len(result.trials)} "
                  f"candidates (decided on the validation split; front: "
                  f"{', '.join(result.front)}); the search: {SEARCH_DIR}/report.md"]
    return Deployed(file=ctx.stage_dir / SEARCH_DIR / CHOSEN_DIR / deployed.artifact,
                    runtime=m.runtime, precision=m.precision, sizes=m.sizes or {},
                    options=m.runtime_options,
                    stats=ModelStats(params=m.params, nonzero_params=m.nonzero_params,
                                     macs=m.macs))
