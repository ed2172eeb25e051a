"""Which model each stage of a run holds, and which stage's model it started from.

Read from the recipe the run record keeps: a training or pruning stage leaves a torch
model that the next stage starts from (it *chains*); a deployment (an ONNX export, a
quantization into a runtime) holds the model it was given. ``from:`` names another start.
The report needs both: a runtime variant of the reference is the reference's model in
another runtime (:func:`model_origins`), and a pruning stage's fraction pruned is
measured against the model it pruned (:func:`stage_inputs`), not against the reference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from netshrink.stages.record import RunRecord, StageRecord

BASELINE = "baseline"  # the stage every recipe starts with, the first model of the run


def chains(kind: str) -> bool:
    """Whether a stage of ``kind`` leaves a torch model the next stage starts from (a
    training or pruning stage), rather than deploying its input to a runtime."""
    from netshrink.stages.base import STAGES, load_builtin_stages

    load_builtin_stages()
    return STAGES.get(kind).chains if kind in STAGES else True


def _recipe_stages(record: RunRecord) -> Iterator[tuple[str, str, str | None]]:
    """``(name, kind, from)`` of each stage the recipe lists, in its order (``from``: None
    where not given); entries that are not stages are passed over."""
    entries = record.recipe.get("stages") if isinstance(record.recipe, dict) else None
    for raw in entries if isinstance(entries, list) else []:
        if isinstance(raw, dict) and "kind" in raw:
            kind = str(raw["kind"])
            source = raw.get("from")
            yield str(raw.get("name") or kind), kind, None if source is None else str(source)


def _walk(record: RunRecord) -> Iterator[tuple[str, str, str]]:
    """``(name, kind, input)`` of each stage the recipe lists: ``input`` is the stage whose
    model it starts from (``from:``, else the last stage before it that chains)."""
    current = BASELINE
    for name, kind, source in _recipe_stages(record):
        yield name, kind, source or current
        if chains(kind):
            current = name


def model_origins(record: RunRecord) -> dict[str, str]:
    """For each stage, the stage whose torch model it holds: itself for a stage that leaves
    a torch model, the stage it started from for a deployment (``export.onnx``,
    ``quant.ptq``, ``deploy.torch``...)."""
    origins = {BASELINE: BASELINE}
    for name, kind, source in _walk(record):
        origins[name] = name if chains(kind) else source
    return origins


def stage_inputs(record: RunRecord, stages: Sequence[StageRecord] = ()) -> dict[str, str]:
    """For each stage the recipe lists, the name of the stage whose model it started from;
    a stage of ``stages`` (ordered by index) that the recipe does not list (a record
    written by hand) starts from the last stage before it, in ``stages``, that chains."""
    inputs = {name: source for name, _, source in _walk(record)}
    current: str | None = None
    for s in stages:
        if s.name not in inputs and current is not None:
            inputs[s.name] = current
        if chains(s.kind):
            current = s.name
    return inputs
