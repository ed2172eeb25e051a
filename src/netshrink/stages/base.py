"""The method table: each method is a config class and one handler
``fn(model, cfg, ctx) -> model | Deployed``, registered under its YAML name.

Recipes look a handler up by the stage's name (``STAGES``), the Python verbs by the
config's type (``method_of``, as torchao's ``quantize_(model, config)`` does), and the
CLI's commands run one-stage recipes: all three reach the same handler with the same
defaults (the config class's), the same export-and-check and the same files.

Adding a method: write its config class (a pydantic model: its fields are the recipe's
keys and the verb's arguments, its defaults everyone's defaults) and its handler, and
register it with ``@stage("family.name", YourConfig, "summary")`` in a module of this
package (imported by ``load_builtin_stages``) or of a plug-in (the ``netshrink.stages``
entry point). That is all: a recipe takes ``kind: family.name``, ``netshrink list
stages`` shows it, and the Python verb of its family takes ``YourConfig`` (``prune.*``:
``netshrink.prune``, ``quant.*``: ``quantize``, ``distill.*``: ``distill``, ``train`` /
``finetune``: ``finetune``, ``export.*``: ``export``). One config class per method: the
verbs find the handler by it.

A stage gets the model the previous stage produced (the runner's own copy, loaded from
that stage's file, so changing it in place harms nobody) and returns the model to save.

A stage whose result runs outside torch (an INT8 ONNX file, OpenVINO IR, a packed file)
returns a ``Deployed`` instead: the runner measures that file in its runtime, and the
next stage gets the last torch model again, so one recipe can compare several
deployments (per-channel vs per-tensor INT8, ONNX Runtime vs OpenVINO) of one model.
"""

from __future__ import annotations

import logging
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
from netshrink.store.checkpoint import save_model
from netshrink.store.codebook import Codebook
from netshrink.store.layout import earlier_stage_file, parse_stage_folder
from netshrink.store.packed import pack_model
from netshrink.train.history import EpochRecord

LOG = logging.getLogger(__name__)  # the default sink of this module's log= lines


def checkpoint_meta(data: DataBundle, *, run: str, stage: str,
                    split: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``predict`` and ``eval`` need to use a model file on its own; ``split``: how
    the run cut its validation images out of the training set (``eval --split val``
    rebuilds exactly those), whether it augmented the training images (``compress``
    fine-tunes the same way) and its ``test_limit`` (``eval`` measures those test images
    by default)."""
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

    ``spec`` is None only where nothing can rebuild the model: the Python API on the
    user's own module before it has a factory. The stage still runs; the torch model
    files it would write (``save_torch``) are not written, and its model stays in memory.
    A recipe's model always has a spec.
    """

    data: DataBundle
    spec: ModelSpec | None
    device: str
    seed: int
    run_dir: Path
    stage_dir: Path  # the stage's own folder: resumable state, extra artifacts
    key: str = ""  # the stage's key: a resumable state must come from the same one
    meta: dict[str, Any] = field(default_factory=dict)  # checkpoint_meta of its model files
    # The recipe's data section as written: for a stage that runs recipes of its own
    # (``compress``) on the same images.
    data_config: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = LOG.info
    progress: bool | None = None
    # Models held in memory by name, found before any earlier stage's file of that name
    # (``teacher_stage: teacher`` of the Python ``distill``, whose teacher is a module).
    models: dict[str, nn.Module] = field(default_factory=dict)
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

    def save_torch(self, model: nn.Module, path: Path, *, meta: dict[str, Any] | None = None,
                   codebooks: dict[str, Codebook] | None = None) -> Path | None:
        """Write ``model`` as a torch model file with the context's spec (``.nspk``:
        packed, with k-means ``codebooks``) and ``meta`` (default: the context's).

        Returns:
            ``path``, or None without a spec (nothing could rebuild the file's model;
            nothing is written).
        """
        if self.spec is None:
            return None
        facts = self.meta if meta is None else meta
        if path.suffix == ".nspk":
            pack_model(model, self.spec, path, codebooks=codebooks, meta=facts)
        else:
            save_model(model, self.spec, path, meta=facts)
        return path

    @property
    def shape_known(self) -> bool:
        """Whether ``input_shape`` is known (a recipe's always is)."""
        return self.data.info.image_size > 0

    @property
    def input_shape(self) -> list[int]:
        """One image, ``[C, H, W]``, as the data gives it.

        Raises:
            UserError: the data does not say (the Python API given neither data nor an
                example input).
        """
        info = self.data.info
        if not self.shape_known:
            raise UserError("the input shape is not known: give example_input= (one batch "
                            "the model takes, e.g. torch.zeros(1, 3, 32, 32)) or data")
        return [info.in_channels, info.image_size, info.image_size]


@dataclass
class Deployed:
    """A stage's model in a form another runtime executes.

    ``file`` is what the size is of (a folder for formats of several files); None only
    for a torch result of a context without a spec (``StageContext.save_torch``), never
    in a recipe. ``model``, when given, is a torch model that continues the chain
    (k-means weights, shared values in float); otherwise the next stage gets the stage's
    input model again.
    """

    file: Path | None
    runtime: str  # "onnxruntime", "openvino" or "torch"
    stats: ModelStats  # counts of the network the file holds
    precision: str | None = None  # recorded precision (and OpenVINO's float hint)
    sizes: dict[str, int] = field(default_factory=dict)  # other files worth comparing
    model: nn.Module | None = None
    options: dict[str, Any] | None = None  # how the runtime prepares it (torch execution)
    # k-means codebooks of ``model`` by layer: a caller that packs it again (the Python
    # result's ``save``) keeps the shared values bit-packed.
    codebooks: dict[str, Codebook] | None = None


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
METHODS: dict[type[BaseModel], str] = {}  # config class -> its stage's name
TRAIN_STATE = "train_state.safetensors"  # a training stage's resumable state

# The Python verb of each family of stages (the name's part before the dot).
VERBS = {"prune": "prune", "quant": "quantize", "distill": "distill", "train": "finetune",
         "finetune": "finetune", "export": "export"}


def family_verb(name: str) -> str | None:
    """The Python verb that runs the stage ``name`` (``prune.channel``: ``prune``); None
    for stages only recipes run (``deploy.torch``, ``compress``)."""
    return VERBS.get(name.split(".", 1)[0])


def method_of(config: BaseModel) -> tuple[str, StageDef]:
    """The stage whose config class ``config`` is (or derives from: the nearest one), as
    ``(name, definition)``.

    Raises:
        UserError: no stage is configured by it.
    """
    load_builtin_stages()
    for cls in type(config).__mro__:
        if cls in METHODS:
            return METHODS[cls], STAGES.get(METHODS[cls])
    raise UserError(f"{type(config).__name__} configures no method; give the config of one "
                    "(netshrink list stages shows them)")


def verb_configs(verb: str) -> list[str]:
    """The config classes the Python verb ``verb`` takes, by name."""
    load_builtin_stages()
    return sorted({cls.__name__ for cls, name in METHODS.items() if family_verb(name) == verb})


def stage(name: str, config: type[BaseModel], summary: str, *, chains: bool = True,
          scratch: tuple[str, ...] = (),
          check: Callable[[Any, str], None] | None = None) -> Callable[[StageFn], StageFn]:
    """Decorator: register ``fn`` as the method ``name`` configured by ``config`` (a
    class no other stage uses).

    ``chains=False`` declares that the stage returns a ``Deployed`` without a torch model;
    ``scratch`` names the resumable-state files it leaves in its folder; ``check(config,
    device)`` refuses a config the recipe's device cannot run, before the run writes.
    """

    def add(fn: StageFn) -> StageFn:
        if config in METHODS:  # the verbs find a handler by its config: one each
            raise ValueError(f"stage {name!r}: {config.__name__} already configures stage "
                             f"{METHODS[config]!r}; give it a config class of its own")
        STAGES.register(name)(StageDef(fn=fn, config=config, summary=summary, chains=chains,
                                       scratch=scratch, check=check))
        METHODS[config] = name
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
