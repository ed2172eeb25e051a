"""The stage registry: ``fn(model, cfg, ctx) -> model`` under a YAML name, with its config.

A stage gets the model the previous stage produced (the runner's own copy, loaded from
that stage's file, so changing it in place harms nobody) and returns the model to save.

A stage whose result runs outside torch (an INT8 ONNX file, OpenVINO IR, a packed file)
returns a ``Deployed`` instead: the runner measures that file in its runtime, and the
next stage gets the last torch model again, so one recipe can compare several
deployments (per-channel vs per-tensor INT8, ONNX Runtime vs OpenVINO) of one model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from torch import nn

from netshrink import __version__
from netshrink.data import DataBundle
from netshrink.errors import UserError
from netshrink.models import ModelSpec
from netshrink.registry import Registry
from netshrink.runtime.base import ModelStats
from netshrink.store.layout import earlier_stage_file, parse_stage_folder
from netshrink.train.history import EpochRecord


def checkpoint_meta(data: DataBundle, *, run: str, stage: str,
                    split: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``predict`` and ``eval`` need to use a model file on its own; ``split``: how
    the run cut its validation images out of the training set (``eval --split val``
    rebuilds exactly those) and whether it augmented the training images (``compress``
    fine-tunes the same way)."""
    info = data.info
    return {
        **({"split": split} if split is not None else {}),
        "dataset": info.name,
        "class_names": info.class_names,
        "image_size": info.image_size,
        "in_channels": info.in_channels,
        "mean": list(info.mean),
        "std": list(info.std),
        "run": run,
        "stage": stage,
        "netshrink_version": __version__,
    }


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
    meta: dict[str, Any] = field(default_factory=dict)  # checkpoint_meta of its model files
    # The recipe's data section as written: for a stage that runs recipes of its own
    # (``compress``) on the same images.
    data_config: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print
    progress: bool | None = None
    # Filled by the stage for the run record:
    history: list[EpochRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def stage_model_file(self, name: str, option: str) -> Path:
        """The torch model file of the earlier stage ``name`` (for options such as
        ``teacher_stage`` that read another stage's model besides the input).

        Raises:
            UserError: no earlier stage of that name saved a torch model.
        """
        here = parse_stage_folder(self.stage_dir.name)
        found = earlier_stage_file(self.run_dir, name, here[0] if here else 0)
        if found is None:
            raise UserError(f"{option} {name!r}: no earlier stage of that name saved a torch "
                            "model; name a stage that comes before this one (e.g. baseline)")
        return found

    @property
    def input_shape(self) -> list[int]:
        """One image, ``[C, H, W]``, as the data gives it."""
        info = self.data.info
        return [info.in_channels, info.image_size, info.image_size]


@dataclass
class Deployed:
    """A stage's model in a form another runtime executes.

    ``file`` is what the size is of (a folder for formats of several files). ``model``,
    when given, is a torch model that continues the chain (k-means weights, shared
    values in float); otherwise the next stage gets the stage's input model again.
    """

    file: Path
    runtime: str  # "onnxruntime", "openvino" or "torch"
    stats: ModelStats  # counts of the network the file holds
    precision: str | None = None  # recorded precision (and OpenVINO's float hint)
    sizes: dict[str, int] = field(default_factory=dict)  # other files worth comparing
    model: nn.Module | None = None
    options: dict[str, Any] | None = None  # how the runtime prepares it (torch execution)


StageFn = Callable[[nn.Module, BaseModel, StageContext], "nn.Module | Deployed"]


@dataclass(frozen=True)
class StageDef:
    fn: StageFn
    config: type[BaseModel]
    summary: str
    # False for stages whose result runs outside torch (export, quantization): the next
    # stage gets their input model, so they are left out of later stages' keys.
    chains: bool = True
    # Glob patterns of the files in its folder that only resume an interrupted stage:
    # removed once the stage's record is written, never filed in the model cache.
    scratch: tuple[str, ...] = ()
    # What the stage's config asks of the recipe's device (fp16 compute, TensorRT),
    # checked by the run before it writes anything: raises UserError.
    check: Callable[[Any, str], None] | None = None


STAGES: Registry[StageDef] = Registry("stage")
TRAIN_STATE = "train_state.safetensors"  # a training stage's resumable state


def stage(name: str, config: type[BaseModel], summary: str, *, chains: bool = True,
          scratch: tuple[str, ...] = (),
          check: Callable[[Any, str], None] | None = None) -> Callable[[StageFn], StageFn]:
    """Decorator: register ``fn`` as the recipe stage ``name`` configured by ``config``.

    ``chains=False`` declares that the stage returns a ``Deployed`` without a torch model;
    ``scratch`` names the resumable-state files it leaves in its folder; ``check(config,
    device)`` refuses a config the recipe's device cannot run, before the run writes.
    """

    def add(fn: StageFn) -> StageFn:
        STAGES.register(name)(StageDef(fn=fn, config=config, summary=summary, chains=chains,
                                       scratch=scratch, check=check))
        return fn

    return add


PLUGIN_GROUP = "netshrink.stages"  # entry points whose modules register more stages
_plugins_loaded = False


def load_builtin_stages() -> None:
    """Import the modules whose stages register themselves (one per stage family), then
    the ``netshrink.stages`` entry points: stages of packages above the recipe layer
    (``compress``, which runs recipes itself) and of other installed packages register
    there, so the recipe layer never imports them and every process that parses a recipe
    (a study's pool or Ray workers too) knows them."""
    global _plugins_loaded
    import netshrink.stages.deploy
    import netshrink.stages.distill
    import netshrink.stages.export
    import netshrink.stages.prune
    import netshrink.stages.prune_analysis
    import netshrink.stages.quant
    import netshrink.stages.train  # noqa: F401

    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for point in entry_points(group=PLUGIN_GROUP):
        try:
            point.load()
        except Exception as exc:  # a broken plug-in names itself, not a traceback
            raise UserError(f"stage plug-in {point.name!r} ({point.value}) failed to load: "
                            f"{exc}; reinstall or remove the package that provides it") from exc
