"""Stage keys: a hash of everything that decides a stage's output, so a finished stage
is reused (or served from the model cache) exactly when nothing upstream changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from netshrink.recipe.schema import Recipe, StageEntry, stage_refs
from netshrink.stages.base import STAGES
from netshrink.store.digest import file_sha256
from netshrink.train import distributed

__all__ = ["config_files", "measure_key", "sha", "stage_keys"]


def sha(obj: Any) -> str:
    """The SHA-256 of ``obj``'s canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def config_files(value: Any) -> list[Path]:
    """The files a config names (a teacher, a student's weights), anywhere in it."""
    if isinstance(value, Path):
        return [value]
    if isinstance(value, BaseModel):
        value = [getattr(value, name) for name in type(value).model_fields]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in config_files(item)]
    return []


def _file_hashes(value: Any) -> list[str]:
    """Hashes of the files a config names: a changed file must change the key even where
    its path did not."""
    return [file_sha256(path) for path in config_files(value) if path.is_file()]


def stage_keys(recipe: Recipe, entries: list[StageEntry],
               data_fingerprint: str | None = None) -> list[str]:
    """Keys of the baseline and every stage; a key changes when anything upstream does.

    ``data_fingerprint``: the content hash of data netshrink does not name itself (a
    factory's, ``DataBundle.fingerprint``): the same factory and arguments may return
    other images tomorrow, and a cached stage is never reused for other data.

    "Upstream" is the chain of torch models a stage starts from (the previous chaining
    stage, or its ``from:``), the stages it reads a teacher from, and the files its
    config names. A stage that does not chain (an export or a quantization, whose file
    the next stage does not get) has a key of its own but is no later stage's upstream,
    so adding, changing or removing one re-runs nothing else.
    """
    weights = recipe.model.weights
    root = {
        "model": recipe.model.model_dump(mode="json"),
        "weights_sha": file_sha256(weights) if weights is not None and weights.is_file() else None,
        "data": recipe.data.model_dump(mode="json", exclude={"batch_size", "num_workers"}),
        "seed": recipe.seed,
    }
    if data_fingerprint is not None:  # (a dataset's keys stay as they always were)
        root["data_content"] = data_fingerprint
    if recipe.device != "cpu":
        # A GPU trains with other kernels and bf16 autocast: not the CPU's model, so not
        # its cache entry or its finished stage. (CPU keys stay as they always were.)
        root["device"] = recipe.device
    world = distributed.current()
    if world.parallel:
        # Data-parallel training equals one process's only to float rounding (and without
        # sync_bn normalises each rank's share alone): its models are not the single
        # process's, so not its cache entries or finished stages. (One process's keys
        # stay as they always were.)
        root["data_parallel"] = world.size
    keys = [sha(root)]
    by_name = {"baseline": keys[0]}
    chain = keys[0]
    for entry in entries:
        parent = by_name[entry.source] if entry.source is not None else chain
        refs = [by_name.get(ref, ref) for ref in stage_refs(entry.config)]
        parts = [parent, entry.kind, entry.config.model_dump(mode="json")]
        extra = refs + _file_hashes(entry.config)
        keys.append(sha([*parts, extra] if extra else parts))
        by_name[entry.name] = keys[-1]
        if STAGES.get(entry.kind).chains:
            chain = keys[-1]
    return keys


def measure_key(recipe: Recipe) -> str:
    """The key of how stages are measured: a changed ``measure:`` section (or device)
    re-measures finished stages without recomputing them."""
    measured = recipe.measure.model_dump(mode="json")
    if not measured["also_cpu"]:
        del measured["also_cpu"]  # runs from before the option keep their measurements
    return sha(measured | ({"device": recipe.device} if recipe.device != "cpu" else {}))
