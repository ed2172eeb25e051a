"""The stage registry: ``fn(model, cfg, ctx) -> model`` under a YAML name, with its config.

A stage gets the model the previous stage produced (the runner's own copy, loaded from
that stage's file, so changing it in place harms nobody) and returns the model to save.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel
from torch import nn

from netshrink.data import DataBundle
from netshrink.models import ModelSpec
from netshrink.recipe.record import EpochRecord
from netshrink.registry import Registry


@dataclass
class StageContext:
    """What a stage may use besides its model and config.

    A stage that changes the model's structure (removes channels) replaces ``spec`` with
    the spec its output is saved and rebuilt with.
    """

    data: DataBundle
    spec: ModelSpec
    device: str
    seed: int
    run_dir: Path
    stage_dir: Path  # the stage's own folder: resumable state, extra artifacts
    key: str = ""  # the stage's key: a resumable state must come from the same one
    log: Callable[[str], None] = print
    progress: bool | None = None
    # Filled by the stage for the run record:
    history: list[EpochRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


StageFn = Callable[[nn.Module, BaseModel, StageContext], nn.Module]


@dataclass(frozen=True)
class StageDef:
    fn: StageFn
    config: type[BaseModel]
    summary: str


STAGES: Registry[StageDef] = Registry("stage")


def stage(name: str, config: type[BaseModel], summary: str) -> Callable[[StageFn], StageFn]:
    """Decorator: register ``fn`` as the recipe stage ``name`` configured by ``config``."""

    def add(fn: StageFn) -> StageFn:
        STAGES.register(name)(StageDef(fn=fn, config=config, summary=summary))
        return fn

    return add


def load_builtin_stages() -> None:
    """Import the modules whose stages register themselves."""
    import netshrink.prune.analysis_stages
    import netshrink.prune.channel_stage
    import netshrink.prune.stages
    import netshrink.train.stages  # noqa: F401
