"""Recipes from Python: ``netshrink.run("recipe.yaml", "runs/x")`` runs (or resumes) a
recipe into a folder and renders its report, as ``netshrink run`` does."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from netshrink.logs import no_log
from netshrink.recipe import Recipe, load_recipe, parse_recipe, run_recipe
from netshrink.stages.record import RunRecord

__all__ = ["run"]

LOG = logging.getLogger(__name__)


def run(recipe: str | Path | dict[str, Any] | Recipe, out: str | Path, *,
        report: bool = True, use_cache: bool = True, quiet: bool = False) -> RunRecord:
    """Run or resume ``recipe`` (a YAML file, a dict, or a parsed ``Recipe``) into ``out``.

    Progress lines go to the ``netshrink`` loggers (shown once logging is configured,
    ``logging.basicConfig(level=logging.INFO)``); ``quiet``: not even there.

    Returns:
        The run record (also in ``out/run.json``).

    Raises:
        UserError: a bad recipe, input or folder (nothing written), a diverged training.
    """
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(Path(recipe))
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe, source="recipe")
    return run_recipe(recipe, Path(out), report=report, use_cache=use_cache,
                      log=no_log if quiet else LOG.info)
