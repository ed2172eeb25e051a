"""What a model file's run measured, for ``eval`` to measure the same images or say why
its top-1 differs.

A run measures every stage on one split (``measure.split``) and on the first images of
it: ``data.test_limit`` cuts the test split to its first N, ``measure.max_eval_images``
evaluates the first N of whichever split; both are "the first N", so the recorded image
count says exactly which images were measured. Two places record it:

* the run's ``run.json``, beside the file in its run folder (``RUN/stages/NN-name/...``):
  each stage's measurement (split, images, top-1 of the file the stage made);
* the file's own metadata, ``split.test_limit`` (written since this module exists): the
  test split's cut, which a file copied out of its run folder keeps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netshrink.errors import UserError
from netshrink.store.layout import RUN_FILE, STAGES_DIR

# stages/NN-name/model.x, or stages/NN-name/openvino/model.xml: the run folder is at most
# this many folders above the file.
_RUN_DEPTH = 4


@dataclass(frozen=True)
class Recorded:
    """The run's measurement: the first ``images`` of ``split`` (None: all of it), its
    top-1 where the run measured this very file, and where that was read."""

    split: str
    images: int | None
    top1: float | None
    source: str

    def describe(self) -> str:
        which = (f"the first {self.images:,} {self.split} images" if self.images is not None
                 else f"the whole {self.split} split")
        top1 = f" (top-1 {self.top1:.2%})" if self.top1 is not None else ""
        return f"{which}{top1}, as {self.source} records"


def recorded_measurement(path: Path, meta: dict[str, Any]) -> Recorded | None:
    """How the run that made ``path`` measured it; None where nothing says (a file from
    elsewhere, or a run that measured every test image and left no ``run.json`` beside
    it)."""
    found = _from_run_record(path, meta)
    if found is not None:
        return found
    split = meta.get("split")
    limit = split.get("test_limit") if isinstance(split, dict) else None
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return Recorded("test", limit, None, "its data.test_limit (the file's metadata)")
    return None


def _from_run_record(path: Path, meta: dict[str, Any]) -> Recorded | None:
    """From the ``run.json`` of the run folder ``path`` lies in, when it is the run the
    file names (``meta['run']``); None when there is none, or it cannot be read (``eval``
    then goes on without it: it is a comparison, not an input)."""
    from netshrink.report.load import load_run

    file = Path(os.path.abspath(path))
    for run_dir in file.parents[1:_RUN_DEPTH]:
        relative = file.relative_to(run_dir).parts
        if relative[0] != STAGES_DIR or not (run_dir / RUN_FILE).is_file():
            continue
        try:
            record = load_run(run_dir)
        except UserError:
            return None
        if meta.get("run") not in (None, record.name):
            return None  # a file put into another run's folder: not what it measured
        folder = Path(*relative[:2])
        own = [s for s in record.stages
               if s.artifact and Path(*Path(s.artifact).parts[:2]) == folder]
        measured = [s for s in [*own, *record.stages]
                    if s.measurement is not None and s.measurement.accuracy is not None
                    and s.measurement.accuracy.images > 0]  # (a record edited to 0: none)
        if not measured:
            return None
        accuracy = measured[0].measurement.accuracy  # type: ignore[union-attr]
        assert accuracy is not None
        this_file = bool(own) and measured[0] is own[0] and _is_artifact(
            run_dir / str(own[0].artifact), file)
        return Recorded(accuracy.split, accuracy.images,
                        accuracy.top1 if this_file else None, str(run_dir / RUN_FILE))
    return None


def _is_artifact(artifact: Path, file: Path) -> bool:
    """Whether ``file`` is the stage's measured artifact (or in it: an IR's folder)."""
    try:
        return os.path.samefile(artifact, file) or (
            artifact.is_dir() and os.path.samefile(artifact, file.parent))
    except OSError:
        return False
