"""Refuse, at save time, a custom model its factory will not rebuild.

A custom model's file holds its weights and the import path of the function that builds
it; loading calls that function and gives the layers the file's widths
(``models.resize``). When that cannot work (a factory that builds another architecture,
a pruned layer netshrink cannot resize, a forward that fixes a width in its code), the
load would fail later, far from the cause. ``check_rebuild`` runs as soon as the file is
written: it builds the factory's model on the ``meta`` device (shapes, no storage; for
real if the factory cannot build there), gives it the weights' widths, checks that every
tensor fits and that one forward pass runs; if not, the file just written is removed and
one line says why.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from netshrink.errors import UserError
from netshrink.limits import clip
from netshrink.models.footprint import meta_forward
from netshrink.models.resize import resize_to_state
from netshrink.store.checkpoint import describe_mismatch

__all__ = ["check_rebuild"]


def check_rebuild(path: Path, state: dict[str, Tensor], factory: str,
                  kwargs: dict[str, Any], input_shape: Sequence[int] = ()) -> None:
    """Rebuild the model ``path`` was just written from, as ``load`` will; on failure
    remove ``path`` and raise.

    Args:
        path: the file just written.
        state: the weights it holds.
        factory: ``package.module:function``.
        kwargs: the arguments it is called with.
        input_shape: one image ``[C, H, W]`` (empty: the forward pass is not tried).

    Raises:
        UserError: the factory cannot be imported or called, builds a model the weights
            do not fit, or one that does not run with their widths (one line; the file is
            gone).
    """
    problem = _problem(state, factory, kwargs, input_shape)
    if problem is not None:
        path.unlink(missing_ok=True)
        raise UserError(f"{path}: not saved, a later load would fail: {problem}")


def _problem(state: dict[str, Tensor], factory: str, kwargs: dict[str, Any],
             input_shape: Sequence[int]) -> str | None:
    module_name, _, function = factory.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        return (f"cannot import {factory} ({clip(str(exc), 120)}); name the function as "
                "the loading program imports it")
    try:
        model = _build(fn, kwargs)
    except Exception as exc:  # whatever the user's factory raises, said in one line
        return (f"{factory}({_args(kwargs)}) fails ({type(exc).__name__}: "
                f"{clip(str(exc), 120)}); give the factory_kwargs it takes")
    if not isinstance(model, nn.Module):
        return f"{factory} returns {type(model).__name__}, not an nn.Module"
    mismatch = describe_mismatch(resize_to_state(model, state), state)
    if mismatch:
        return (f"the weights do not fit the model {factory} builds, even given their layer "
                f"widths ({mismatch}); the factory must build this architecture (pass the "
                "widths it cannot take from the weights as factory_kwargs)")
    if input_shape:
        try:
            meta_forward(model, list(input_shape))
        except NotImplementedError:
            return None  # an op without a meta kernel: nothing more can be said here
        except Exception:  # confirmed (or not) on real tensors below
            return _runs_for_real(fn, kwargs, state, factory, input_shape)
    return None


def _runs_for_real(fn: Callable[..., Any], kwargs: dict[str, Any], state: dict[str, Tensor],
                   factory: str, input_shape: Sequence[int]) -> str | None:
    """What the meta-device forward could not say (a forward that reads values, which
    meta tensors do not have): the model built for real, loaded, run on one image."""
    try:
        model = resize_to_state(fn(**kwargs), state)
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except Exception as exc:  # the user's forward: any error means it does not run
        return (f"the model {factory} builds does not run with the saved widths "
                f"({type(exc).__name__}: {clip(str(exc), 120)}); its forward fixes a "
                "width the pruning changed")
    return None


def _build(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """``fn(**kwargs)`` on the meta device, or for real when it cannot build there."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(**kwargs)
    except NotImplementedError:  # a factory that computes with tensors (torchvision's RegNet)
        return fn(**kwargs)


def _args(kwargs: dict[str, Any]) -> str:
    return clip(", ".join(f"{k}={v!r}" for k, v in kwargs.items()), 80)
