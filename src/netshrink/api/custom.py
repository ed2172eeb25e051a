"""Files of models netshrink did not build: weights plus the import path of the function
that builds the architecture (``package.module:function``), which is called only when
the user names it as trusted at load time.

A file never holds code: the factory is a name, resolved by ``importlib`` from the user's
own installed packages, and only if it is in the ``trust`` the caller gives. Its
arguments are the caller's when the trust gives them (``trust={factory: kwargs}``);
otherwise the file's, and then only plain values within bounds, and the model is built
on the ``meta`` device first (shapes, no storage): it may take no more than a model
file may hold, and must have exactly the file's tensors once given the file's widths,
before it is built for real.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from netshrink.data.bounds import max_image_size
from netshrink.errors import UserError
from netshrink.limits import bounded_json, clip
from netshrink.models.resize import resize_to_state
from netshrink.store.atomic import atomic_write_bytes
from netshrink.store.checkpoint import (
    MAX_IN_CHANNELS,
    MAX_MODEL_BYTES,
    describe_mismatch,
)

__all__ = ["CUSTOM_FORMAT", "Trust", "load_custom", "save_custom"]

CUSTOM_FORMAT = "netshrink.custom/1"
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")

# Factories the caller trusts: their names (the file's arguments are used, within the
# bounds below), or each name with the arguments to call it with (the file's ignored).
Trust = Sequence[str] | Mapping[str, Mapping[str, Any]]

# What a file may pass its factory when only the factory's name is trusted: widths,
# class counts, flags, names. Larger values (or other kinds) the caller passes itself.
MAX_KWARGS = 32
MAX_KWARG_INT = 1 << 16
MAX_KWARG_TEXT = 200
MAX_KWARG_LIST = 16
_ALLOWED = (f"whole numbers within +-{MAX_KWARG_INT:,}, finite numbers, true, false, null, "
            f"text of up to {MAX_KWARG_TEXT} characters, or lists of up to "
            f"{MAX_KWARG_LIST} of these")


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
                trust: Trust) -> tuple[nn.Module, str, dict[str, Any], dict[str, Any]]:
    """Rebuild a custom model: call its factory (only if trusted), give its layers the
    file's widths (a channel-pruned model), load the weights strictly.

    Args:
        path: the file (for messages).
        state: its tensors.
        header: its safetensors metadata.
        trust: the factories the caller trusts: names (called with the file's
            ``factory_kwargs``, each a plain value within bounds, and built on the meta
            device first), or a mapping of name to the arguments to call it with.

    Returns:
        ``(model in eval mode, factory, meta, the arguments it was called with)``.

    Raises:
        UserError: the factory is not trusted or cannot be imported; its arguments are out
            of bounds or refused by it; or it builds a model the weights do not fit.
    """
    factory = _check_factory(header.get("factory", ""))
    if isinstance(trust, str):  # one name, not the characters of one
        trust = (trust,)
    if factory not in trust:
        raise UserError(f"{path}: built by {factory}, which netshrink runs only when you "
                        f"trust it: load(path, trust=[{factory!r}])")
    try:
        meta = bounded_json(header.get("meta", "{}"))
    except ValueError as exc:
        raise UserError(f"{path}: unreadable meta ({exc})") from None
    _check_custom_meta(meta, path)
    chosen = isinstance(trust, Mapping)
    kwargs = (_caller_kwargs(trust[factory], factory) if isinstance(trust, Mapping)  # yours
              else _file_kwargs(header.get("factory_kwargs", "{}"), factory, path))
    module_name, function = factory.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"{path}: cannot import {factory} ({exc}); install the package "
                        "that defines the model") from None
    if not chosen:
        _check_shell(fn, kwargs, factory, state, path)
    model = resize_to_state(_call(fn, kwargs, factory, path), state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: the weights do not fit the model {factory} builds "
                        f"({str(exc).splitlines()[0][:200]})") from None
    return model.eval(), factory, meta, kwargs


def _check_custom_meta(meta: Any, path: Path) -> None:
    """The keys other code reads from a custom file's meta: the input's size."""
    if not isinstance(meta, dict):
        raise UserError(f"{path}: meta must be a JSON object")
    for key, top in (("image_size", max_image_size()), ("in_channels", MAX_IN_CHANNELS)):
        value = meta.get(key)
        if key in meta and not (isinstance(value, int) and not isinstance(value, bool)
                                and 1 <= value <= top):
            shown = value if isinstance(value, int) else type(value).__name__
            raise UserError(f"{path}: meta {key} is {shown}, expected a whole number 1-{top}")


def _caller_kwargs(kwargs: Any, factory: str) -> dict[str, Any]:
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise UserError(f"trust={{{factory!r}: ...}}: give the factory's keyword arguments "
                        f"as a dict of names to values, not {type(kwargs).__name__}")
    return dict(kwargs)


def _file_kwargs(raw: Any, factory: str, path: Path) -> dict[str, Any]:
    """The file's ``factory_kwargs``: at most ``MAX_KWARGS`` names, each a plain value."""
    try:
        kwargs = bounded_json(raw if isinstance(raw, str) else "{}", max_bytes=1 << 16)
    except ValueError as exc:
        raise UserError(f"{path}: unreadable factory_kwargs ({exc})") from None
    if not isinstance(kwargs, dict):
        raise UserError(f"{path}: factory_kwargs must be a JSON object")
    yours = f"pass them yourself: load(path, trust={{{factory!r}: {{...}}}})"
    if len(kwargs) > MAX_KWARGS:
        raise UserError(f"{path}: {len(kwargs)} factory_kwargs, more than the {MAX_KWARGS} a "
                        f"file may set; {yours}")
    for key, value in kwargs.items():
        if not (key.isidentifier() and len(key) <= 64):
            raise UserError(f"{path}: factory_kwargs name {key[:40]!r} is not an argument "
                            f"name; {yours}")
        if not _plain(value) and not (isinstance(value, list) and len(value) <= MAX_KWARG_LIST
                                      and all(_plain(v) for v in value)):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise UserError(f"{path}: factory_kwargs {key}={shown}: a file may set its "
                            f"factory's arguments only to {_ALLOWED}; {yours}")
    return kwargs


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_KWARG_INT
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_KWARG_TEXT


def _call(fn: Callable[..., Any], kwargs: dict[str, Any], factory: str,
          path: Path) -> nn.Module:
    """``fn(**kwargs)``, its refusal of the arguments as a ``UserError``."""
    try:
        model = fn(**kwargs)
    except NotImplementedError:
        raise  # a meta-device build that cannot be done (``_check_shell``), no refusal
    except (TypeError, ValueError, RuntimeError, OverflowError, KeyError, IndexError,
            AssertionError) as exc:  # how factories refuse a variant they do not know
        text = " ".join(str(exc).split())[:200]
        raise UserError(f"{path}: {factory} refused the arguments {_shown(kwargs)} "
                        f"({type(exc).__name__}: {text}); check the file's factory_kwargs, "
                        f"or pass them yourself: load(path, trust={{{factory!r}: "
                        "{...}})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{factory} returned {type(model).__name__}, not an nn.Module")
    return model


def _shown(kwargs: dict[str, Any]) -> str:
    return clip(json.dumps(kwargs), 120)


def _check_shell(fn: Callable[..., Any], kwargs: dict[str, Any], factory: str,
                 state: dict[str, Tensor], path: Path) -> None:
    """Build the model on the ``meta`` device (no storage): what the factory builds from
    the file's arguments may take no more than a model file may hold
    (``MAX_MODEL_BYTES``), and once given the file's widths it must have exactly the
    file's tensors.

    Raises:
        UserError: the factory cannot build there, builds too much, or builds a model
            the file's weights do not fit.
    """
    yours = f"pass them yourself: load(path, trust={{{factory!r}: {{...}}}})"
    try:
        # Its warnings (a zero-width layer's init) come again from the real build.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shell = _call(fn, kwargs, factory, path)
    except NotImplementedError as exc:
        if not kwargs:  # the factory's own defaults: nothing of the file's to bound
            return
        raise UserError(f"{path}: {factory} does not build on the meta device ({exc}), so "
                        "the size of what the file's factory_kwargs ask for cannot be checked "
                        f"first; {yours}") from None
    size = sum(t.numel() * t.element_size() for t in chain(shell.parameters(), shell.buffers()))
    if size > MAX_MODEL_BYTES:
        raise UserError(f"{path}: {factory} would build a model of {size:,} bytes from the "
                        f"file's arguments {_shown(kwargs)}, more than the {MAX_MODEL_BYTES:,} "
                        f"a model file may hold; {yours}")
    problem = describe_mismatch(resize_to_state(shell, state), state)
    if problem:
        raise UserError(f"{path}: the weights do not fit the model {factory} builds with "
                        f"{_shown(kwargs)}: {problem}")
