"""Recipe stages: the adapters between a recipe's YAML and the methods.

Each stage is ``fn(model, config, ctx) -> model | Deployed`` registered under its YAML
name with its config class (``base.stage``); one module per family (train, distill,
prune, quant, export, deploy). The methods below (``netshrink.prune``, ``quant``,
``distill``, ``train``, ``export``) know nothing of recipes; the runner above
(``netshrink.recipe``) knows nothing of any method.
"""

from netshrink.stages.base import (
    STAGES,
    TRAIN_STATE,
    Deployed,
    StageContext,
    StageDef,
    load_builtin_stages,
    stage,
)

__all__ = ["STAGES", "TRAIN_STATE", "Deployed", "StageContext", "StageDef",
           "load_builtin_stages", "stage"]
