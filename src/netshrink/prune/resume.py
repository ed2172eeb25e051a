"""Resuming an iterative pruning stage after its last finished step.

An iterative stage (prune, fine-tune, prune more, ...) can run for hours. After each
finished step it saves its model here, with the stage's key; run again after an
interruption, it reloads the latest step of the *same* stage (same key: same input model,
same config) and goes on from the next one. Each step's fine-tuning also resumes mid-epoch
through the training loop's own state. What follows a step depends only on the weights
it saved, so a resumed stage ends with the model an uninterrupted one would. The runner
removes the step files once the stage's record is written (its measurement done).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from netshrink.errors import UserError
from netshrink.models import ModelSpec
from netshrink.store.checkpoint import load_model, save_model
from netshrink.store.walls import remove_file
from netshrink.train.history import EpochRecord

__all__ = ["StepCheckpoints"]

PREFIX = "prune_step_"
STEP_FILES = f"{PREFIX}*"  # every file of the finished steps (models, training states)


@dataclass
class StepCheckpoints:
    """The finished steps of one stage, in its folder, under its key."""

    folder: Path
    key: str
    spec: ModelSpec | None  # None: a model nothing rebuilds (the Python API): none kept
    current: int = 0  # the step running now (its fine-tuning's state file is named by it)
    # The stage's training history (ctx.history): kept with each step, given back on resume.
    history: list[EpochRecord] = field(default_factory=list)

    def _file(self, step: int) -> Path:
        return self.folder / f"{PREFIX}{step:03d}.safetensors"

    def train_state(self) -> Path:
        """Where the running step's fine-tuning keeps its resumable state."""
        return self.folder / f"{PREFIX}{self.current:03d}_train_state.safetensors"

    def save(self, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
        """Keep ``model`` as it is after the running step (and ``extra`` facts); earlier
        steps' files and this step's training state go."""
        if self.spec is None:
            return  # nothing could reload it: this stage runs in one go
        step = self.current
        history = [h.model_dump(mode="json") for h in self.history]
        save_model(model, self.spec, self._file(step),
                   meta={"stage_key": self.key, "step": step, "extra": extra or {},
                         "history": history})
        for older in self.folder.glob(f"{PREFIX}*"):
            if older != self._file(step):
                remove_file(older)

    def latest(self) -> tuple[int, nn.Module, dict[str, Any]] | None:
        """``(step, model, extra)`` of the last finished step of this stage, or None; the
        training history up to it is put back in ``history``."""
        for path in sorted(self.folder.glob(f"{PREFIX}[0-9][0-9][0-9].safetensors"),
                           reverse=True):
            try:
                model, _, meta = load_model(path)
            except UserError:
                continue  # unreadable: that step runs again
            if meta.get("stage_key") == self.key:
                self.history[:] = [EpochRecord.model_validate(h)
                                   for h in meta.get("history", [])]
                return int(meta["step"]), model, dict(meta.get("extra") or {})
        return None

