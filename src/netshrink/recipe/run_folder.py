"""A run's folder, and the walls around it.

Everything that reads or changes ``--out`` as a whole lives here: the previous
``run.json`` (its names and paths checked to stay inside the folder), the inputs checked
before the first write, the stage folders the run owns (recorded before each is made, so
only they are ever removed or moved), and the clean-up of writes a killed run left.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from netshrink.data import DataBundle
from netshrink.data.bounds import batch_sizes, check_config_batches
from netshrink.errors import UserError
from netshrink.models.footprint import check_training_memory, training_bytes
from netshrink.recipe.keys import config_files
from netshrink.recipe.schema import Recipe, StageEntry
from netshrink.stages.base import STAGES
from netshrink.stages.record import MAX_RUN_FILE_BYTES, RunRecord, StageRecord
from netshrink.store.atomic import atomic_write_text, is_temp_name
from netshrink.store.checkpoint import load_model
from netshrink.store.layout import (
    PLOTS_DIR,
    RUN_FILE,
    RUN_OUTPUTS,
    STAGES_DIR,
    check_inputs_outside,
    check_name,
    check_out_folder,
    inside,
    parse_stage_folder,
    stage_path,
)
from netshrink.store.walls import (
    make_dirs,
    refuse_links,
    remove_file,
    remove_tree,
    rename_owned,
)
from netshrink.train import distributed
from netshrink.train.config import TrainConfig
from netshrink.train.loop import autocast_dtype

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines

__all__ = ["MAX_RUN_FILE_BYTES", "RunFolder", "now"]


def now() -> str:
    """The time as run records keep it (UTC, ISO 8601, seconds)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunFolder:
    """The folder ``out`` a recipe runs into."""

    def __init__(self, out: Path, recipe: Recipe, log: Callable[[str], None] = LOG.info) -> None:
        self.out = out
        self.recipe = recipe
        self.log = log
        self._train_bytes: int | None = None  # activations a training step keeps, an image

    def write(self, record: RunRecord) -> None:
        """Write ``run.json`` (atomically), stamped now."""
        record.updated = now()
        atomic_write_text(self.out / RUN_FILE, record.model_dump_json(indent=2))

    def load_previous(self) -> RunRecord | None:
        """The run record already in ``out``, its names and paths checked to stay inside
        the folder; None for a new or empty folder.

        Raises:
            UserError: ``out`` is a file or someone else's folder, or its ``run.json`` is
                unreadable or names paths outside it (written by hand, or tampered with).
        """
        if not check_out_folder(self.out):
            return None
        path = self.out / RUN_FILE
        try:
            if path.stat().st_size > MAX_RUN_FILE_BYTES:
                raise UserError(f"{path}: too large to be a run record; move the folder away "
                                "or choose another --out")
            previous = RunRecord.model_validate_json(path.read_bytes())
        except (ValueError, OSError, RecursionError) as exc:
            why = (exc.errors()[0]["msg"] if isinstance(exc, ValidationError)
                   else str(exc).splitlines()[0])
            raise UserError(f"{path}: unreadable run record ({why[:200]}); move the folder "
                            "away or choose another --out") from None
        for stage in previous.stages:
            check_name(stage.name, f"{path}: stage name")
            if stage.artifact is not None:
                inside(self.out, stage.artifact, f"{path}: artifact")
                parts = Path(stage.artifact).parts
                if (len(parts) < 3 or parts[0] != STAGES_DIR
                        or parse_stage_folder(parts[1]) is None):
                    raise UserError(f"{path}: artifact {stage.artifact!r} is not in a stage "
                                    "folder (stages/NN-name/...); move the folder away or "
                                    "choose another --out")
        for folder in previous.folders:
            if parse_stage_folder(folder) is None:
                raise UserError(f"{path}: {folder!r} is not a stage folder name; move the "
                                "folder away or choose another --out")
        self.refuse_planted_links(previous)
        return previous

    def refuse_planted_links(self, previous: RunRecord) -> None:
        """Refuse a symbolic link wherever this run will write or remove: its record and
        reports, ``stages/`` and ``report_files/``, and every stage folder it owns, whole.
        (A folder of the user's own in ``stages/`` is never touched, link or not.)

        Raises:
            UserError: naming the link.
        """
        owned = [f"{STAGES_DIR}/{name}" for name in self.owned_folders(previous)]
        refuse_links(self.out, RUN_OUTPUTS, what="run", deep=[PLOTS_DIR, *owned])

    def preflight(self, data: DataBundle, entries: list[StageEntry],
                  model: nn.Module | None = None) -> None:
        """Check what the stages will read, before the run folder is touched: every file a
        stage's config names loads as a model of this dataset's classes, every batch fits
        (the images, and the activations a training batch of ``model`` keeps), and no
        input lies where the run writes.

        Raises:
            UserError: naming the stage, the file and the fix.
        """
        if self.recipe.data.name == "imagefolder" and self.recipe.data.root is not None:
            # Decoded lazily while training: a bad image in val/ would otherwise surface
            # after an epoch, with stage files already written.
            from netshrink.data.imagefolder import check_image_folder

            n = check_image_folder(self.recipe.data.root)
            self.log(f"checked {n:,} images in {self.recipe.data.root}")
        inputs: list[tuple[str, Path]] = []
        if self.recipe.model.weights is not None:
            inputs.append(("model.weights", self.recipe.model.weights))
        if self.recipe.data.root is not None:
            inputs.append(("data.root", self.recipe.data.root))
        largest = max(len(data.train), len(data.test))
        for i, entry in enumerate(entries):
            where = f"stages[{i}] ({entry.name})"
            check = STAGES.get(entry.kind).check
            if check is not None:
                try:
                    check(entry.config, self.recipe.device)
                except UserError as exc:
                    raise UserError(f"{where}: {exc}") from None
            check_config_batches(entry.config, where, channels=data.info.in_channels,
                                 size=data.info.image_size, largest=largest)
            if model is not None:
                self._check_training_batches(entry.config, where, model, data, largest)
            for path in config_files(entry.config):
                inputs.append((f"{where}: file", path))
                if not path.is_file():
                    raise UserError(f"{where}: {path} not found (or not a regular file); give "
                                    "the path of a model file")
                _, spec, _ = load_model(path)
                if spec.num_classes != data.info.num_classes:
                    raise UserError(
                        f"{where}: {path} predicts {spec.num_classes} classes but "
                        f"{data.info.name} has {data.info.num_classes}; give a model "
                        "trained on this dataset")
        check_inputs_outside(self.out, inputs)

    def _check_training_batches(self, config: BaseModel, where: str, model: nn.Module,
                                data: DataBundle, largest: int) -> None:
        """The training batches of a stage (a training config's ``batch_size``, any
        ``finetune_batch_size``) fit the device with the activations they keep: per
        process (torchrun splits a batch among them), in the type autocast computes in."""
        batches = [(place, batch) for place, batch in batch_sizes(config)
                   if "finetune" in place
                   or (place == "batch_size" and isinstance(config, TrainConfig))]
        if not batches:
            return
        if self._train_bytes is None:
            shape = [data.info.in_channels, data.info.image_size, data.info.image_size]
            try:
                self._train_bytes = training_bytes(model, shape)
            except Exception as exc:  # a user's module the meta device cannot run
                self.log(f"note: the training memory of {type(model).__name__} could not be "
                         f"estimated ({str(exc).splitlines()[0][:120] if str(exc) else exc!r});"
                         " its batches are not checked against the device")
                self._train_bytes = 0
        half = autocast_dtype(getattr(config, "amp", "off"),
                              torch.device(self.recipe.device)) is not None
        per_image = self._train_bytes // 2 if half else self._train_bytes
        processes = distributed.launched().size
        for place, batch in batches:
            check_training_memory(per_image, math.ceil(min(batch, largest) / processes),
                                  f"{where}: {place}", self.recipe.device)

    def owned_folders(self, previous: RunRecord | None) -> list[str]:
        """The stage folders netshrink made in ``out``: those its record lists, those its
        stages' files are in, and (runs recorded before the list existed) an interrupted
        stage's folder that has the name this recipe gives that position."""
        if previous is None:
            return []
        owned = set(previous.folders)
        owned |= {Path(s.artifact).parts[1] for s in previous.stages if s.artifact}
        if not previous.folders:
            names = ["baseline"] + [e.name for e in self.recipe.parsed_stages()]
            owned |= {stage_path(self.out, i, n).name for i, n in enumerate(names)
                      if stage_path(self.out, i, n).is_dir()}
        return sorted(owned)

    def clear_interrupted_writes(self, previous: RunRecord) -> None:
        """Remove the temporary files of writes a killed run left half done (only names
        the atomic writer makes, only in the folders this run owns)."""
        folders = [self.out, self.out / PLOTS_DIR]
        folders += [self.out / STAGES_DIR / name for name in self.owned_folders(previous)]
        for folder in folders:
            if folder.is_dir() and not folder.is_symlink():
                for path in folder.iterdir():
                    if is_temp_name(path.name) and path.is_file() and not path.is_symlink():
                        remove_file(path)

    def claim(self, record: RunRecord, folder: Path) -> None:
        """Record ``folder`` as this run's before creating it, so that a run killed inside
        the stage still knows the folder is its own to resume or remove.

        Raises:
            UserError: the folder exists but netshrink did not make it.
        """
        if folder.name not in record.folders:
            if folder.exists() or folder.is_symlink():
                raise UserError(f"{folder} exists but was not made by this run; move it away "
                                "or choose another --out")
            record.folders.append(folder.name)
            self.write(record)
        make_dirs(folder)

    def move(self, record: RunRecord, prior: StageRecord, index: int,
              stage_dir: Path) -> None:
        """Give a reused stage its new position's folder (stages before it came or went)."""
        assert prior.artifact is not None
        old_file = self.out / prior.artifact
        old_dir = self.out.joinpath(*Path(prior.artifact).parts[:2])  # stages/NN-name
        if old_dir.resolve() != stage_dir.resolve():
            if stage_dir.exists():
                if stage_dir.name not in record.folders:
                    raise UserError(f"{stage_dir} exists but was not made by this run; move "
                                    "it away or choose another --out")
                remove_tree(stage_dir)
            elif stage_dir.name not in record.folders:
                record.folders.append(stage_dir.name)
            rename_owned(old_dir, stage_dir)
            prior.artifact = str((stage_dir / old_file.relative_to(old_dir))
                                 .relative_to(self.out))
        prior.index = index
        prior.name = stage_dir.name.split("-", 1)[1]

    def remove_dropped(self, record: RunRecord) -> None:
        """Remove the stage folders this run made for stages no longer in the recipe;
        anything else in ``stages/`` (the user's own files) is left alone."""
        kept = {Path(s.artifact).parts[1] for s in record.stages if s.artifact}
        for name in sorted(set(record.folders) - kept):
            folder = self.out / STAGES_DIR / name
            if folder.is_dir() and not folder.is_symlink():
                remove_tree(folder)
            record.folders.remove(name)
        self.write(record)
