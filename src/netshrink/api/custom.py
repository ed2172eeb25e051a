"""Files of models netshrink did not build: weights plus the import path of the function
that builds the architecture (``package.module:function``), called only when the user
trusts it at load time (``netshrink.models.factory``).

They are ordinary netshrink model files whose spec names the factory
(``netshrink.models.custom_spec``), so every command and stage that reads a model file
reads them, and ``load_model`` rebuilds them (``netshrink.store.checkpoint``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from netshrink.errors import UserError
from netshrink.models import custom_spec
from netshrink.models.factory import Trust, check_factory
from netshrink.store.checkpoint import save_model

__all__ = ["Trust", "save_custom"]


def save_custom(model: nn.Module, path: Path, *, factory: str,
                factory_kwargs: dict[str, Any] | None = None,
                meta: dict[str, Any] | None = None) -> int:
    """Write ``model``'s weights with the import path of its factory (atomically).

    Raises:
        UserError: ``factory`` is not ``module:function`` or its arguments are not JSON.
    """
    check_factory(factory)
    try:
        json.dumps(factory_kwargs or {})
        json.dumps(meta or {})
    except TypeError as exc:
        raise UserError(f"factory_kwargs and meta must be JSON values ({exc})") from None
    return save_model(model, custom_spec(model, factory, factory_kwargs), path,
                      meta=meta or {})
