"""Which layers a pruning method touches: conv and linear layers chosen by name patterns.

Patterns are shell-style (``fnmatch``) on module names as ``model.named_modules()`` gives
them: ``fc``, ``layer4.*``, ``*.conv2``. A pattern that matches no prunable layer is an
error, because a typo would otherwise silently prune nothing (or everything).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from netshrink.errors import UserError

PRUNABLE = (nn.Conv2d, nn.Linear)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv and linear layer of ``model`` by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


def select_layers(
    model: nn.Module, *, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, nn.Module]:
    """Conv/linear layers whose names match ``include`` (all when None) and not ``exclude``.

    Raises:
        UserError: the model has no conv/linear layer, a pattern matches none, or the
            patterns leave nothing to prune.
    """
    layers = prunable_layers(model)
    if not layers:
        raise UserError(
            f"{type(model).__name__} has no Conv2d or Linear layer: nothing to prune"
        )
    names = list(layers)
    for pattern in (include or []) + (exclude or []):
        if not any(fnmatchcase(name, pattern) for name in names):
            sample = ", ".join([*names[:4], "...", *names[-2:]] if len(names) > 6 else names)
            raise UserError(
                f"layer pattern {pattern!r} matches no conv/linear layer; names look like: {sample}"
            )
    chosen = {
        name: m
        for name, m in layers.items()
        if (include is None or any(fnmatchcase(name, p) for p in include))
        and not any(fnmatchcase(name, p) for p in exclude or [])
    }
    if not chosen:
        raise UserError(f"include={include} exclude={exclude} leave no layer to prune")
    return chosen
