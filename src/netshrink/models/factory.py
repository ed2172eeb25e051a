"""The user's own models: the import path of the function that builds one
(``package.module:function``) and its arguments, called only when the user trusts it.

A file never holds code: a model file names its factory, and ``importlib`` resolves that
name from the user's installed packages, but only if the running command trusts it: a
``--trust pkg.mod:fn`` flag, ``trust=[...]`` in Python, a recipe that names the factory
in its ``model:`` section or its ``trust:`` list. A trust may also give the arguments to
call the factory with (``trust={name: kwargs}``), which then replace the file's.

The file's own arguments are plain values within bounds (widths, class counts, flags,
names): what a file may make a trusted function do is what a caller would plainly type.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from netshrink.errors import UserError
from netshrink.limits import IMPORT_PATH, clip

__all__ = ["MAX_KWARGS", "Trust", "call_factory", "check_factory", "check_factory_kwargs",
           "trusted_arguments", "trusted_names", "trusting"]

FACTORY_PATTERN = IMPORT_PATH
MAX_FACTORY_CHARS = 200

# Factories trusted: their names, or each name with the arguments to call it with.
Trust = Sequence[str] | Mapping[str, Mapping[str, Any]]

# What a file may pass its factory: widths, class counts, flags, names. Larger values (or
# other kinds) the caller passes itself through its trust.
MAX_KWARGS = 32
MAX_KWARG_INT = 1 << 16
MAX_KWARG_TEXT = 200
MAX_KWARG_LIST = 16
ALLOWED_KWARGS = (f"whole numbers within +-{MAX_KWARG_INT:,}, finite numbers, true, false, "
                  f"null, text of up to {MAX_KWARG_TEXT} characters, or lists of up to "
                  f"{MAX_KWARG_LIST} of these")
HOW_TO_TRUST = ("--trust {f} (command line), trust=[{f!r}] (Python) or trust: [{f}] "
                "(recipe)")

# name -> the caller's arguments (None: the file's own); nested trusts add up.
_TRUSTED: contextvars.ContextVar[Mapping[str, dict[str, Any] | None] | None] = \
    contextvars.ContextVar("netshrink_trusted_factories", default=None)


def check_factory(factory: Any, what: str = "factory") -> str:
    """``factory`` itself when it is ``package.module:function``.

    Raises:
        UserError: anything else.
    """
    if (not isinstance(factory, str) or len(factory) > MAX_FACTORY_CHARS
            or not FACTORY_PATTERN.fullmatch(factory)):
        shown = clip(repr(factory), 80)
        raise UserError(f"{what} {shown} is not an import path; give 'package.module:function' "
                        "(the function that builds the model)")
    return factory


def check_factory_kwargs(kwargs: Any, factory: str, where: str) -> dict[str, Any]:
    """A file's arguments for ``factory``: at most ``MAX_KWARGS`` names, each a plain value.

    Raises:
        UserError: not an object, too many, or a value beyond ``ALLOWED_KWARGS``.
    """
    yours = f"pass them yourself: trust={{{factory!r}: {{...}}}}"
    if not isinstance(kwargs, dict):
        raise UserError(f"{where}: factory_kwargs must be a JSON object of argument names")
    if len(kwargs) > MAX_KWARGS:
        raise UserError(f"{where}: {len(kwargs)} factory_kwargs, more than the {MAX_KWARGS} "
                        f"a file may set; {yours}")
    for key, value in kwargs.items():
        if not (isinstance(key, str) and key.isidentifier() and len(key) <= 64):
            raise UserError(f"{where}: factory_kwargs name {clip(repr(key), 40)} is not an "
                            f"argument name; {yours}")
        if not _plain(value) and not (isinstance(value, list) and len(value) <= MAX_KWARG_LIST
                                      and all(_plain(v) for v in value)):
            raise UserError(f"{where}: factory_kwargs {key}={clip(json.dumps(value), 60)}: a "
                            f"file may set its factory's arguments only to {ALLOWED_KWARGS}; "
                            f"{yours}")
    return kwargs


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_KWARG_INT
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_KWARG_TEXT


@contextlib.contextmanager
def trusting(trust: Trust | str | None) -> Iterator[None]:
    """Within the block, the factories ``trust`` names may be called to build models.

    Raises:
        UserError: a name that is not an import path, or arguments that are not a dict.
    """
    added: dict[str, dict[str, Any] | None] = {}
    if isinstance(trust, str):  # one name, not the characters of one
        trust = (trust,)
    if isinstance(trust, Mapping):
        for name, kwargs in trust.items():
            check_factory(name, "trust")
            if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
                raise UserError(f"trust={{{name!r}: ...}}: give the factory's keyword "
                                f"arguments as a dict of names to values, not "
                                f"{type(kwargs).__name__}")
            added[name] = dict(kwargs)
    else:
        for name in trust or ():
            added[check_factory(name, "trust")] = None
    token = _TRUSTED.set({**(_TRUSTED.get() or {}), **added})
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def trusted_arguments(factory: str, where: str) -> dict[str, Any] | None:
    """The caller's arguments for ``factory``, or None: call it with the file's own.

    Raises:
        UserError: ``factory`` is not trusted here; the message says how to trust it.
    """
    trusted = _TRUSTED.get() or {}
    if factory not in trusted:
        raise UserError(f"{where}: built by {factory}, which netshrink runs only when you "
                        f"trust it: {HOW_TO_TRUST.format(f=factory)}")
    return trusted[factory]


def trusted_names() -> list[str]:
    """The factories trusted here (a recipe run passes them on to its workers)."""
    return sorted(_TRUSTED.get() or {})


def call_factory(factory: str, kwargs: dict[str, Any], where: str) -> nn.Module:
    """Import ``factory`` and call it with ``kwargs``; its refusal of the arguments as a
    ``UserError``. The caller has checked that it is trusted.

    Raises:
        UserError: it cannot be imported, refuses the arguments, or returns no module.
    """
    module_name, function = factory.split(":")
    try:
        fn: Callable[..., Any] = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"{where}: cannot import {factory} ({clip(str(exc), 160)}); install "
                        "the package that defines the model, or put it on PYTHONPATH") from None
    try:
        model = fn(**kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError, KeyError, IndexError,
            AssertionError) as exc:  # how factories refuse a variant they do not know
        raise UserError(f"{where}: {factory} refused the arguments "
                        f"{clip(json.dumps(kwargs), 120)} ({type(exc).__name__}: "
                        f"{clip(' '.join(str(exc).split()), 200)}); check the factory's "
                        f"arguments, or pass them yourself: trust={{{factory!r}: "
                        "{...}}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{where}: {factory} returned {type(model).__name__}, not an nn.Module")
    return model
