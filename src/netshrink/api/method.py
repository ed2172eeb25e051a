"""The Python verbs' one road to the methods: the handler the config's type names in the
method table (``netshrink.stages.base.method_of``), run on a copy of the user's model in a
``StageContext`` built from the verb's arguments, its result wrapped as a ``Compressed``.

Recipes and the CLI run the same handlers, so a verb has the recipe's defaults (the
config class's), its export-and-check and its files.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from netshrink.api.data import Data, bundle
from netshrink.api.result import Compressed, ScratchFolder
from netshrink.data import Batch, DataBundle, DatasetInfo
from netshrink.errors import UserError
from netshrink.heartbeat import heartbeat
from netshrink.models import ModelSpec, custom_spec, io_widths
from netshrink.stages.base import (
    Deployed,
    StageContext,
    StageDef,
    family_verb,
    method_of,
    verb_configs,
)
from netshrink.store.atomic import atomic_write_bytes
from netshrink.store.kinds import file_kind
from netshrink.store.outputs import check_output_file, is_model_kind, output_folder
from netshrink.store.walls import make_dirs

__all__ = ["MissingSplit", "Model", "run_method", "unwrap", "verb_data"]

Model = nn.Module | Compressed
LOG = logging.getLogger(__name__)  # the verbs' progress lines


class MissingSplit:
    """A split the caller did not give: reading it is a one-line error naming the
    argument that gives it (a method that does not read it never notices)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __len__(self) -> int:
        raise UserError(self.message)

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                seed: int = 0) -> Iterator[Batch]:
        raise UserError(self.message)


def unwrap(model: Model) -> Compressed:
    """A ``Compressed`` view of ``model`` (the user's module, or a verb's result)."""
    if isinstance(model, Compressed):
        return model
    if not isinstance(model, nn.Module):
        raise UserError(f"give a torch nn.Module (or a netshrink result), not "
                        f"{type(model).__name__}")
    spec = getattr(model, "netshrink_spec", None)
    return Compressed(model=model, input_shape=[],
                      spec=spec if isinstance(spec, ModelSpec) else None)


def torch_model(base: Compressed, verb: str) -> nn.Module:
    """The torch model a verb works on.

    Raises:
        UserError: the result is only a runtime's file.
    """
    if base.model is None:
        raise UserError(f"{verb} works on a torch model; this result is only a "
                        f"{base.runtime} file")
    return base.model


def verb_data(module: nn.Module, config: BaseModel, *, train: Data | None = None,
              val: Data | None = None, calib: Data | None = None,
              example_input: Tensor | None = None, known_shape: list[int] | None = None,
              calib_arg: str = "calibration=") -> DataBundle:
    """The method's splits from the verb's arguments. Training data also calibrates when
    no calibration data is given; a split not given is a ``MissingSplit`` whose message
    names the argument (``val`` stays None: methods that need it say so themselves).
    Without any images the facts come from ``example_input`` (or ``known_shape``, an
    earlier result's), else from the model's layers with the image size unknown."""
    label = type(config).__name__.removesuffix("Config")
    if example_input is None and known_shape:
        example_input = torch.zeros(1, *known_shape)
    given = {k: v for k, v in {"train": train, "val": val, "calib": calib}.items()
             if v is not None}
    made = bundle(module, **given) if given else None
    info = made.info if made is not None else _layer_facts(module, example_input)
    missing_train = MissingSplit(f"{label} trains: give data= (a DataLoader of training "
                                 "batches)")
    train_split = made.train if made is not None and train is not None else missing_train
    calib_split = (made.calib if made is not None and (calib is not None or train is not None)
                   else MissingSplit(f"{label} calibrates: give {calib_arg} (a DataLoader of "
                                     "a few hundred training images)"))
    return DataBundle(info=info, train=train_split,
                      val=made.val if made is not None else None,
                      test=MissingSplit(f"{label} tests: give labelled data"),
                      calib=calib_split)


def _layer_facts(module: nn.Module, example: Tensor | None) -> DatasetInfo:
    """The facts without data, from the model's layers (classes) and the example's shape
    (nothing is run); without an example the image size is unknown (0:
    ``StageContext.input_shape`` asks for one).

    Raises:
        UserError: an example that is not one square image batch ``[N, C, S, S]``.
    """
    channels, classes = io_widths(module)
    size = 0
    if example is not None:
        if example.ndim != 4 or example.shape[2] != example.shape[3]:
            raise UserError(f"example_input of shape {tuple(example.shape)}: give one batch "
                            "of square images [N, C, S, S], e.g. torch.zeros(1, 3, 32, 32)")
        channels, size = int(example.shape[1]), int(example.shape[2])
    channels, classes = channels or 3, classes or 1
    return DatasetInfo(name="custom", num_classes=classes, in_channels=channels,
                       image_size=size, class_names=[str(i) for i in range(classes)],
                       mean=(0.0,) * channels, std=(1.0,) * channels)


def _resolve(verb: str, config: object) -> tuple[str, StageDef]:
    """The stage of ``config`` if it is one of ``verb``'s methods.

    Raises:
        UserError: naming the configs ``verb`` takes.
    """
    takes = f"{verb} takes {', '.join(verb_configs(verb))}"
    if not isinstance(config, BaseModel):
        raise UserError(f"{takes}, not {type(config).__name__}")
    try:
        name, definition = method_of(config)
    except UserError:
        raise UserError(f"{takes}, not {type(config).__name__}") from None
    other = family_verb(name)
    if other != verb:
        where = f"netshrink.{other}" if other else "a recipe stage"
        raise UserError(f"{takes}, not {type(config).__name__} (the {name} method: "
                        f"{where})")
    return name, definition


def _spec_of(base: Compressed, module: nn.Module) -> ModelSpec | None:
    """How the method's torch files rebuild the model: netshrink's spec, the user's
    factory, or None (nothing can: those files are not written)."""
    if base.spec is not None:
        return base.spec
    if base.factory is not None:
        return custom_spec(module, base.factory, base.factory_kwargs)
    return None


def run_method(verb: str, base: Compressed, config: BaseModel, *, device: str = "cpu",
               out: Path | None = None, models: dict[str, nn.Module] | None = None,
               **data: Any) -> Compressed:
    """Run ``config``'s handler on a copy of ``base``'s model, on the splits ``data``
    names (``verb_data``'s arguments); the result as a ``Compressed``. The handler works
    in a fresh temporary folder; a deployable file it makes is copied into ``out`` when
    given (never over a file of the user's), else stays in that folder, which the result
    then owns (``ScratchFolder``: removed once the result is garbage collected). Every
    other way out of here, a failure included, removes the folder before returning.

    Raises:
        UserError: ``config`` is not one of ``verb``'s methods, or the method's refusal.
    """
    name, definition = _resolve(verb, config)
    module = torch_model(base, verb)
    splits = verb_data(module, config, known_shape=base.input_shape, **data)
    if definition.check is not None:
        definition.check(config, device)
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"out={out}: a file; give a folder for the files {verb} writes")
    work = Path(tempfile.mkdtemp(prefix="netshrink-"))
    owner: ScratchFolder | None = None
    try:
        ctx = StageContext(data=splits, spec=_spec_of(base, module), device=device, seed=0,
                           run_dir=work, stage_dir=work, meta=dict(base.meta), log=LOG.info,
                           progress=False, models=dict(models or {}))
        given = copy.deepcopy(module).eval()  # the handler may change its model in place
        with heartbeat(f"netshrink.{verb}", LOG.info):  # an export, NNCF: minutes, silent
            result = definition.fn(given, config, ctx)
        for pattern in definition.scratch:  # resumable state: nothing resumes a verb
            for path in work.glob(pattern):
                path.unlink(missing_ok=True)
        made = _wrap(base, name, ctx, result, given)
        if made.file is not None and out is not None:
            make_dirs(out)
            made.file = place_file(made.file, out / made.file.name, flag="out=")
        if made.file is not None and made.file.is_relative_to(work):
            # The file must outlive this call but not the result: the folder's removal
            # is handed to the result, the last step here (nothing after it can fail).
            owner = made._scratch = ScratchFolder(work)
        return made
    finally:
        if owner is None:
            shutil.rmtree(work, ignore_errors=True)


def _wrap(base: Compressed, name: str, ctx: StageContext, result: nn.Module | Deployed,
          given: nn.Module) -> Compressed:
    """The handler's result as a ``Compressed`` made from ``base``."""
    shape = ctx.input_shape if ctx.shape_known else base.input_shape
    epochs = [f"epoch {h.epoch}: loss {h.train_loss:.4f}" for h in ctx.history]
    note = f"{name}: " + "; ".join([*ctx.notes, *epochs] or ["done"])
    kept: dict[str, Any] = {
        "input_shape": shape, "spec": ctx.spec if base.spec is not None else None,
        "factory": base.factory, "factory_kwargs": dict(base.factory_kwargs),
        "meta": dict(base.meta), "notes": [*base.notes, note]}
    if not isinstance(result, Deployed):
        return Compressed(model=result.cpu().eval(), **kept)
    model = result.model if result.model is not None else given
    return Compressed(model=model.cpu().eval(), file=_runnable_file(result.file),
                      runtime=result.runtime, precision=result.precision or "fp32",
                      stats=result.stats, codebooks=result.codebooks, **kept)


def _runnable_file(file: Path | None) -> Path | None:
    """The file that runs: an OpenVINO IR kept as a folder is its ``.xml``."""
    if file is not None and file.is_dir():
        found = sorted(file.glob("*.xml"))
        if len(found) == 1:
            return found[0]
    return file


def place_file(src: Path, dest: Path, *, flag: str, inputs: tuple[Path, ...] = ()) -> Path:
    """Copy a made file (an IR's ``.xml`` with its ``.bin``) to ``dest``: only over an
    earlier output of the same kind, never over a file of the user's or an input.

    Raises:
        UserError: ``dest`` is taken, or its folder cannot be written.
    """
    pairs = [(src, dest)]
    if src.suffix == ".xml":  # an OpenVINO IR: the weights file goes with it
        pairs.append((src.with_suffix(".bin"), dest.with_suffix(".bin")))
    check_output_file(dest, flag=flag, writes=f"a {src.suffix} model",
                      replaceable=is_model_kind(file_kind(src)),
                      inputs=[*inputs, *(s for s, _ in pairs)],
                      companions=[d for _, d in pairs[1:]])
    with output_folder(dest.parent):
        for source, target in reversed(pairs):  # the .bin before the .xml that names it
            atomic_write_bytes(target, source.read_bytes())
    return dest
