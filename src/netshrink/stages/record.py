"""``run.json``: what a run did, stage by stage. The runner writes it; the report reads
nothing else."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from netshrink.bench.schema import Measurement
from netshrink.train.history import EpochRecord

__all__ = ["MAX_RUN_FILE_BYTES", "EpochRecord", "RunRecord", "StageRecord"]

# A run record is a few kilobytes per stage; a file far beyond that is not one.
MAX_RUN_FILE_BYTES = 64 << 20


class StageRecord(BaseModel):
    """One stage of a run; ``index`` 0 is always the baseline."""

    model_config = ConfigDict(extra="forbid")

    index: int
    name: str  # unique within the run, e.g. "baseline", "train", "finetune"
    kind: str  # the registered stage kind, or "baseline"
    status: Literal["done", "failed"] = "done"
    key: str = ""  # hash of everything upstream that decides this stage's output
    measure_key: str = ""  # hash of the measure settings the measurement used
    config: dict[str, Any] = Field(default_factory=dict)
    artifact: str | None = None  # checkpoint path relative to the run folder
    measurement: Measurement | None = None
    # The torch model also timed on the CPU, in a GPU recipe with ``measure.also_cpu``.
    cpu_measurement: Measurement | None = None
    history: list[EpochRecord] = Field(default_factory=list)
    seconds: float = 0.0  # wall time of the stage itself, measurement excluded
    measure_seconds: float = 0.0
    started: str
    finished: str | None = None
    notes: list[str] = Field(default_factory=list)


class RunRecord(BaseModel):
    """The whole run: the recipe as given, and every finished stage."""

    model_config = ConfigDict(extra="forbid")

    name: str
    recipe: dict[str, Any]
    recipe_sha256: str
    netshrink_version: str
    created: str
    updated: str
    stages: list[StageRecord] = Field(default_factory=list)
    # The stage folders (``NN-name``) this run made: the only ones it may remove.
    folders: list[str] = Field(default_factory=list)
