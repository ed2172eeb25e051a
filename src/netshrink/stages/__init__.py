"""The method table: the handlers between a recipe's YAML (or a Python verb's config) and
the methods.

Each stage is ``fn(model, config, ctx) -> model | Deployed`` registered under its YAML
name with its config class (``base.stage``: how to add one), found by name (``STAGES``)
or by the config's type (``method_of``); one module per family (train, distill, prune,
quant, export, deploy). The methods below (``netshrink.prune``, ``quant``,
``distill``, ``train``, ``export``) know nothing of recipes; the runner above
(``netshrink.recipe``) knows nothing of any method.
"""

from netshrink.stages.base import (
    METHODS,
    STAGES,
    TRAIN_STATE,
    Deployed,
    StageContext,
    StageDef,
    load_builtin_stages,
    method_of,
    stage,
)

__all__ = ["METHODS", "STAGES", "TRAIN_STATE", "Deployed", "StageContext", "StageDef",
           "load_builtin_stages", "method_of", "stage"]
