"""``run.json``: what a run did, stage by stage. The runner writes it; the report reads
nothing else."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from netshrink.bench.schema import CpuLoad, Latency, Measurement
from netshrink.train.history import EpochRecord

__all__ = ["MAX_RUN_FILE_BYTES", "EpochRecord", "RunRecord", "SideBySide", "SideBySideTiming",
           "StageRecord"]

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


class SideBySideTiming(BaseModel):
    """One stage's file timed in the round-robin at the end of the run."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    key: str  # the stage's key when timed: a stage run again since makes it stale
    runtime: str
    latency: Latency  # batch 1, one round a round-robin round
    throughput: Latency | None = None  # batch N, likewise


class SideBySide(BaseModel):
    """The run's files timed side by side, round-robin, in one process at the end of the
    run: the timings every ratio a headline or verdict states comes from (each stage's
    own timing, taken right after it was made, minutes apart, stays in its record)."""

    model_config = ConfigDict(extra="forbid")

    timed: str  # when (ISO 8601)
    rounds: int
    threads: int
    cpu: str  # the machine (``Environment.cpu``)
    load_before: CpuLoad
    load_after: CpuLoad
    stages: list[SideBySideTiming] = Field(default_factory=list)

    def of(self, stage: StageRecord) -> SideBySideTiming | None:
        """``stage``'s timing here, unless the stage has been run again since."""
        return next((t for t in self.stages if t.stage == stage.name and t.key == stage.key),
                    None)


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
    side_by_side: SideBySide | None = None  # the end-of-run timings (None: not taken)
