"""Recipes: validated YAML, the stage registry, and the runner that measures every stage."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from netshrink.heartbeat import heartbeat
from netshrink.recipe.schema import Recipe, load_recipe, parse_recipe
from netshrink.stages.record import RunRecord

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

__all__ = ["Recipe", "RunRecord", "load_recipe", "parse_recipe", "run_recipe", "run_recipe_file"]


def run_recipe(
    recipe: Recipe,
    out: Path,
    *,
    report: bool = True,
    log: Callable[[str], None] = LOG.info,
    progress: bool | None = None,
    use_cache: bool = True,
    reuse_baseline_measurement: bool = False,
    reuse_measurements: bool = False,
    side_by_side: bool = True,
) -> RunRecord:
    """Run (or resume) ``recipe`` into the folder ``out``; render its report.

    Args:
        log: where the run's progress lines go (default: the ``netshrink.recipe``
            logger; see ``netshrink.logs``).
        use_cache: take stage models from, and file them in, the model cache that every
            run shares (``$NETSHRINK_CACHE``; see ``netshrink.recipe.cache``).
        reuse_baseline_measurement: measure a weights file's baseline once per file,
            settings and machine (kept in the cache), as one-off commands do.
        reuse_measurements: the same for every torch model a stage leaves (a study's
            cells share their trained models through the cache: each is measured once).
        side_by_side: at the end, time every stage's file again side by side (the
            figures the report's ratios come from; ``recipe.side_by_side``). A study's
            cells leave it to the study, which times its cells' files so.

    Returns:
        The run record also written to ``out/run.json``.

    Under ``torchrun`` with several processes, rank 0 runs the recipe and writes every
    file; the other ranks only train with it (``netshrink.train.distributed``) and return
    rank 0's record.
    """
    from netshrink.recipe.cache import ModelCache, default_cache_dir
    from netshrink.recipe.runner import Runner
    from netshrink.train import distributed
    from netshrink.train.loop import follow

    if recipe.device == "auto":
        import torch

        recipe = recipe.model_copy(
            update={"device": "cuda" if torch.cuda.is_available() else "cpu"})
        if distributed.launched().leader:
            log(f"device: auto -> {recipe.device}")
    world = distributed.init(recipe.device)
    if not world.leader:
        return follow()  # type: ignore[return-value]
    with distributed.leading(world) as lead:
        started = time.perf_counter()
        root = default_cache_dir() if use_cache else None
        cache = ModelCache(root) if root is not None else None
        record = Runner(recipe, out, log=log, progress=progress, cache=cache,
                        reuse_baseline_measurement=reuse_baseline_measurement,
                        reuse_measurements=reuse_measurements,
                        side_by_side=side_by_side).run()
        if report:
            from netshrink.report import build_content, load_run, render_report

            log("rendering the report")
            with heartbeat("rendering the report", log):
                md, html = render_report(out)
            # the end of the log says what came of it: the report's one-sentence verdict
            log(build_content(load_run(out), with_plots=False).headline.replace("**", ""))
            log(f"finished in {(time.perf_counter() - started) / 60:.1f} min; report: {md} "
                f"and {html}")
        lead.result = record
    return record


def run_recipe_file(
    path: Path,
    out: Path,
    *,
    data_dir: Path | None = None,
    device: str | None = None,
    report: bool = True,
    use_cache: bool = True,
) -> RunRecord:
    """Load ``path``, apply command-line overrides, and run it into ``out``."""
    recipe = load_recipe(path)
    updates = {}
    if data_dir is not None:
        updates["data"] = recipe.data.model_copy(update={"root": data_dir})
    if device is not None:
        updates["device"] = device
    if updates:
        recipe = recipe.model_copy(update=updates)
    return run_recipe(recipe, out, report=report, use_cache=use_cache)
