"""Refuse, at save time, the user's model its factory will not rebuild.

A file of the user's own model holds its weights and the import path of the function
that builds it; loading calls that function and gives the layers the file's widths
(``models.resize``). When that cannot work (a factory that builds another architecture,
a pruned layer netshrink cannot resize, a forward that fixes a width in its code), the
load would fail later, far from the cause. ``check_rebuild`` loads the file just written
as a later load will (trusting its factory by name, so with the file's own arguments) and
runs one image through it; if that fails, the file is removed and one line says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from netshrink.errors import UserError
from netshrink.limits import clip
from netshrink.models.factory import trusting
from netshrink.store.checkpoint import load_model
from netshrink.store.packed import load_packed_model

__all__ = ["check_rebuild"]


def check_rebuild(path: Path, factory: str, input_shape: Sequence[int] = ()) -> None:
    """Load ``path`` again, as ``netshrink.load(path, trust=[factory])`` will, and run one
    image of ``input_shape`` through it (empty: not run); on failure remove ``path``.

    Raises:
        UserError: the file does not load or its model does not run (one line; the file
            is gone).
    """
    try:
        with trusting([factory]):
            model = (load_packed_model if path.suffix == ".nspk" else load_model)(path)[0]
    except UserError as exc:
        path.unlink(missing_ok=True)
        reason = str(exc).removeprefix(f"{path}: ")
        raise UserError(f"{path}: not saved, loading it again fails: {reason}") from None
    if not input_shape:
        return
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except Exception as exc:  # the user's forward: any error means it does not run
        path.unlink(missing_ok=True)
        raise UserError(f"{path}: not saved, the model {factory} builds does not run with "
                        f"the saved widths ({type(exc).__name__}: {clip(str(exc), 120)}); "
                        "its forward fixes a width the pruning changed") from None
