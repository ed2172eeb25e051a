"""Files of models netshrink did not build: weights plus the import path of the function
that builds the architecture (``package.module:function``), which is called only when
the user names it as trusted at load time.

A file never holds code: the factory is a name, resolved by ``importlib`` from the user's
own installed packages, and only if it is in the ``trust`` list the caller gives.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save as st_save
from torch import Tensor, nn

from netshrink.errors import UserError
from netshrink.limits import bounded_json
from netshrink.models.resize import resize_to_state
from netshrink.store.atomic import atomic_write_bytes

__all__ = ["CUSTOM_FORMAT", "load_custom", "save_custom"]

CUSTOM_FORMAT = "netshrink.custom/1"
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _check_factory(factory: str) -> str:
    if not isinstance(factory, str) or not _FACTORY.fullmatch(factory):
        raise UserError(f"factory {factory!r} is not an import path; give "
                        "'package.module:function' (the function that builds the model)")
    return factory


def save_custom(model: nn.Module, path: Path, *, factory: str,
                factory_kwargs: dict[str, Any] | None = None,
                meta: dict[str, Any] | None = None) -> int:
    """Write ``model``'s weights with the import path of its factory (atomically).

    Raises:
        UserError: ``factory`` is not ``module:function`` or its arguments are not JSON.
    """
    _check_factory(factory)
    try:
        kwargs = json.dumps(factory_kwargs or {})
        meta_json = json.dumps(meta or {})
    except TypeError as exc:
        raise UserError(f"factory_kwargs and meta must be JSON values ({exc})") from None
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    header = {"format": CUSTOM_FORMAT, "factory": factory, "factory_kwargs": kwargs,
              "meta": meta_json}
    atomic_write_bytes(path, st_save(tensors, metadata=header))
    return path.stat().st_size


def load_custom(path: Path, state: dict[str, Tensor], header: dict[str, str],
                trust: Sequence[str]) -> tuple[nn.Module, str, dict[str, Any]]:
    """Rebuild a custom model: call its factory (only if trusted), give its layers the
    file's widths (a channel-pruned model), load the weights strictly.

    Returns:
        ``(model in eval mode, factory, meta)``.

    Raises:
        UserError: the factory is not trusted, cannot be imported, or builds a model the
            weights do not fit.
    """
    factory = _check_factory(header.get("factory", ""))
    if factory not in trust:
        raise UserError(f"{path}: built by {factory}, which netshrink runs only when you "
                        f"trust it: load(path, trust=[{factory!r}])")
    try:
        kwargs = bounded_json(header.get("factory_kwargs", "{}"))
        meta = bounded_json(header.get("meta", "{}"))
    except ValueError as exc:
        raise UserError(f"{path}: unreadable factory_kwargs or meta ({exc})") from None
    if not isinstance(kwargs, dict) or not isinstance(meta, dict):
        raise UserError(f"{path}: factory_kwargs and meta must be JSON objects")
    module_name, function = factory.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"{path}: cannot import {factory} ({exc}); install the package "
                        "that defines the model") from None
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"{factory} returned {type(model).__name__}, not an nn.Module")
    model = resize_to_state(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: the weights do not fit the model {factory} builds "
                        f"({str(exc).splitlines()[0][:200]})") from None
    return model.eval(), factory, meta
