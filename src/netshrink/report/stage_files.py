"""Read what stages leave beside their model files, for the report's pruning plots and tables.

``run.json`` holds every number of the tables; the pruning stages also write per-layer
details into their stage folder (``sensitivity.json``, ``search.json``, ``sparsity.json``,
``channels.json``), and the weights themselves are in each stage's model file. This is
the report's only I/O besides ``run.json``, kept out of :mod:`netshrink.report.content`
so that building the report stays a pure function of what was read.

Everything here is optional: a run folder copied without its ``stages/`` (or with files
removed) still renders, with a note naming what was skipped and why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from torch import Tensor

from netshrink.errors import UserError
from netshrink.report.verdict import reference_stage
from netshrink.stages.record import RunRecord, StageRecord
from netshrink.store.checkpoint import read_state_dict
from netshrink.store.layout import STAGES_DIR, recorded_stage_folder


class _Loose(BaseModel):
    # Only the fields the report shows are required: a stage may add more later.
    model_config = ConfigDict(extra="ignore")


class SensitivityRow(_Loose):
    layer: str
    kind: str = "layer"
    top1: float
    drop: float  # baseline top-1 minus this top-1, a fraction


class SensitivityScan(_Loose):
    """``sensitivity.json`` of a ``prune.sensitivity`` stage."""

    method: str
    ratio: float
    split: str
    baseline_top1: float
    rows: list[SensitivityRow]


class SearchProbe(_Loose):
    ratio: float
    top1: float
    kept: bool


class SearchResult(_Loose):
    """``search.json`` of a ``prune.search`` stage: every bisection probe."""

    method: str
    scope: str
    split: str
    tolerance_points: float
    baseline_top1: float
    ratio: float
    probes: list[SearchProbe]


class LayerSparsity(_Loose):
    """One row of ``sparsity.json`` (magnitude / N:M / search stages)."""

    layer: str
    weights: int
    zeros: int
    sparsity: float


class LayerChannels(_Loose):
    """One row of ``channels.json`` (``prune.channel``)."""

    name: str
    type: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int
    params_before: int
    params_after: int


@dataclass(frozen=True)
class StageFiles:
    """What one stage's folder holds besides its model, each ``None`` when absent."""

    sensitivity: SensitivityScan | None = None
    search: SearchResult | None = None
    sparsity: list[LayerSparsity] | None = None
    channels: list[LayerChannels] | None = None


@dataclass(frozen=True)
class WeightPair:
    """All conv/linear weights of two models of one architecture, each flattened: the
    reference's (or the first model of the later one's architecture) and a later one's."""

    before_stage: str
    after_stage: str
    before: Tensor
    after: Tensor


@dataclass(frozen=True)
class RunFiles:
    """Everything the report reads besides ``run.json``; empty when nothing was found."""

    stages: Mapping[int, StageFiles] = field(default_factory=dict)  # by stage index
    weights: WeightPair | None = None
    notes: tuple[str, ...] = ()  # what was skipped, and why


# file name -> (attribute of StageFiles, how to validate it)
_FILES: dict[str, tuple[str, TypeAdapter[Any]]] = {
    "sensitivity.json": ("sensitivity", TypeAdapter(SensitivityScan)),
    "search.json": ("search", TypeAdapter(SearchResult)),
    "sparsity.json": ("sparsity", TypeAdapter(list[LayerSparsity])),
    "channels.json": ("channels", TypeAdapter(list[LayerChannels])),
}
# Which file each pruning stage kind always writes: only those are missed when absent.
_EXPECTED = {
    "prune.sensitivity": "sensitivity.json",
    "prune.search": "search.json",
    "prune.magnitude": "sparsity.json",
    "prune.nm": "sparsity.json",
    "prune.channel": "channels.json",
}


def stage_folder(stage: StageRecord) -> Path:
    """The stage's folder relative to the run: ``stages/NN-name``, as the runner lays it out.

    Taken from the artifact path when there is one: a stage renamed or renumbered by a
    later run keeps its files where its artifact says.
    """
    return recorded_stage_folder(stage.artifact, stage.index, stage.name)


def _read_stage(run_dir: Path, stage: StageRecord, notes: list[str]) -> StageFiles:
    found: dict[str, Any] = {}
    folder = stage_folder(stage)
    for filename, (attr, adapter) in _FILES.items():
        path = run_dir / folder / filename
        if not path.is_file():
            if _EXPECTED.get(stage.kind) == filename:
                notes.append(f"{folder / filename} not found (run folder moved or cleaned?): "
                             f"the per-layer details of stage {stage.name} are skipped.")
            continue
        try:
            found[attr] = adapter.validate_python(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError) as exc:
            first = str(exc).splitlines()[0][:160]
            notes.append(f"{folder / filename} is unreadable ({first}): skipped.")
    return StageFiles(**found)


# A model's architecture as the weights tell it: each tensor's name and rank. Channel
# pruning narrows layers (other sizes, same names and ranks): the same architecture.
Architecture = frozenset[tuple[str, int]]


def _conv_linear_weights(path: Path) -> tuple[Architecture, Tensor]:
    """The model file's architecture, and every conv (4-d) and linear (2-d) weight in it
    flattened into one tensor.

    Picked by shape, so no model needs building: batch-norm weights are 1-d.
    """
    import torch

    state, _ = read_state_dict(path)  # safetensors only; never unpickles
    chosen = [t.flatten().float() for k, t in state.items()
              if k.endswith("weight") and t.dim() in (2, 4)]
    architecture = frozenset((k, t.dim()) for k, t in state.items())
    return architecture, torch.cat(chosen) if chosen else torch.zeros(0)


def _torch_file(stage: StageRecord) -> bool:
    return (stage.status == "done" and stage.artifact is not None
            and stage.artifact.endswith(".safetensors"))


def _read_weights(
    run_dir: Path, stages: list[StageRecord], reference: int | None, notes: list[str]
) -> WeightPair | None:
    """The weights of the last stage that left a torch model file, and those of the
    reference (``stages[reference]``) to compare them with, where both are one
    architecture. A reference of another architecture (a ResNet-50 teacher distilled into
    a ResNet-18) is no "before" of the last model: the first torch model after it with
    the last one's architecture is, and a note says so; with none, no histogram."""
    if reference is None or not _torch_file(stages[reference]):
        return None
    later = [s for s in stages[reference + 1:] if _torch_file(s)]
    if not later:
        return None  # nothing to compare: no torch model after the reference
    last = later[-1]
    read: dict[str, tuple[Architecture, Tensor]] = {}

    def weights(stage: StageRecord) -> tuple[Architecture, Tensor] | None:
        path = run_dir / str(stage.artifact)
        if not path.is_file():
            notes.append(f"{stage.artifact} not found (run folder moved or cleaned?): "
                         "the weight histogram is skipped.")
            return None
        try:
            read[stage.name] = _conv_linear_weights(path)
        except UserError as exc:
            notes.append(f"weight histogram skipped: {exc}")
            return None
        return read[stage.name]

    if weights(last) is None:
        return None
    for before in (stages[reference], *later[:-1]):
        if weights(before) is None:
            return None
        if read[before.name][0] == read[last.name][0]:
            break
    else:
        notes.append(f"Weight histogram skipped: no model before {last.name} has its "
                     f"architecture (the reference {stages[reference].name} has other "
                     "parameters), and the weights of two architectures are no before and "
                     "after of one model.")
        return None
    if before is not stages[reference]:
        notes.append(f"The weight histogram compares {before.name} with {last.name}: the "
                     f"reference {stages[reference].name} has another architecture (other "
                     "parameters), so its weights are no \"before\" of theirs.")
    return WeightPair(before.name, last.name, read[before.name][1], read[last.name][1])


def load_run_files(run_dir: Path, record: RunRecord) -> RunFiles:
    """Read the per-layer files and the weights the report plots, from ``run_dir``."""
    run_dir = Path(run_dir)
    stages = sorted(record.stages, key=lambda s: s.index)
    if not (run_dir / STAGES_DIR).is_dir():
        if any(s.artifact for s in stages):
            # One note rather than one per file: the whole folder went missing.
            return RunFiles(notes=(f"{run_dir / STAGES_DIR} not found (run.json copied without "
                                   "it?): the weight histogram and per-layer pruning details "
                                   "are skipped.",))
        return RunFiles()
    notes: list[str] = []
    per_stage = {s.index: _read_stage(run_dir, s, notes) for s in stages if s.status == "done"}
    reference = reference_stage(record, stages)
    position = reference.position if reference is not None else None
    weights = _read_weights(run_dir, stages, position, notes)
    return RunFiles(stages=per_stage, weights=weights, notes=tuple(notes))
