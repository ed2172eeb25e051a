"""Searches from Python: ``netshrink.compress`` (the smallest or fastest deployable file
within an accuracy budget) and ``netshrink.study`` (a matrix of recipes), as the
``netshrink compress`` and ``netshrink study`` commands run them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from netshrink.compress import CompressConfig, CompressResult
from netshrink.compress import compress as run_compress
from netshrink.compress.options import compress_config, held_out_split
from netshrink.data import data_source
from netshrink.data.factory import in_memory_source
from netshrink.errors import UserError
from netshrink.logs import no_log
from netshrink.models import ModelSpec, custom_spec
from netshrink.models.factory import Trust, check_factory, trusting
from netshrink.stages.start import section_of
from netshrink.store.checkpoint import load_model, save_model
from netshrink.store.walls import make_dirs
from netshrink.study import StudyOutcome, load_study, parse_study, run_study

__all__ = ["compress", "study"]

LOG = logging.getLogger(__name__)  # progress lines, unless quiet


def _model_section(model: str | Path | nn.Module, out: Path, factory: str | None,
                   factory_kwargs: dict[str, Any] | None
                   ) -> tuple[dict[str, Any], dict, Callable[[], None] | None]:
    """The recipe model section of ``model``, the metadata its file carries, and for a
    module the writer that saves it into ``out/input`` (candidates are recipes, and a
    recipe starts from a file) once every check has passed.

    Raises:
        UserError: the user's own module without the factory that rebuilds it.
    """
    if isinstance(model, nn.Module):
        spec = getattr(model, "netshrink_spec", None)
        if factory is not None:
            spec = custom_spec(model, check_factory(factory), factory_kwargs)
        if not isinstance(spec, ModelSpec):
            raise UserError(f"compress runs each candidate from a file, so it rebuilds the "
                            f"model: give the function that builds this "
                            f"{type(model).__name__}, compress(model, out, factory="
                            "'package.module:function', factory_kwargs={...})")
        path = out / "input" / "model.safetensors"
        module = model

        def write_input() -> None:
            make_dirs(path.parent)
            save_model(module, spec, path, meta={})

        return section_of(spec, path), {}, write_input
    path = Path(model)
    _, spec, meta = load_model(path)
    return section_of(spec, path), meta, None


def compress(model: str | Path | nn.Module, out: str | Path, *, data: str | None = None,
             data_dir: str | Path | None = None, data_kwargs: dict[str, Any] | None = None,
             train: Any = None, val: Any = None, test: Any = None,
             class_names: list[str] | None = None, config: CompressConfig | None = None,
             device: str = "cpu", quiet: bool = False, factory: str | None = None,
             factory_kwargs: dict[str, Any] | None = None, trust: Trust = (),
             **settings: Any) -> CompressResult:
    """Search channel pruning, sparsity, k-means sharing or INT8 on ``model`` for the
    smallest (``target="size"``) or fastest (``"latency"``) deployable file within
    ``budget_points`` of top-1 on a held-out validation split.

    Args:
        model: a model file netshrink reads, or a model it built.
        out: the search's folder (candidates, results store, report, ``chosen/``).
        data: a registered dataset's name (default: the one the model file names), or
            your data factory ``pkg.mod:fn`` (called with ``data_kwargs``).
        data_dir: where the dataset's files are (default: the dataset's usual place).
        train: instead of ``data``, your own data (with ``val`` and ``test``):
            ``DataLoader``s (or torch ``Dataset``s) of ``(images, labels)``. Candidates
            are fine-tuned on ``train``, decided on ``val`` (default: ``val_size`` images
            held out of ``train``) and the chosen one reported on ``test``; they run in
            this process. The fine-tuning batch size defaults to ``train``'s.
        val: your own validation data (see ``train``).
        test: your own test data (see ``train``).
        class_names: the classes' names (default: the model file's, or the data's).
        factory: for the user's own module, the function that builds it
            (``package.module:function``); trusted for the search.
        factory_kwargs: the arguments ``factory`` is called with.
        trust: factories a model file may name (``netshrink.load``'s ``trust``).
        quiet: no progress lines at all; by default they go to the ``netshrink``
            loggers (shown once logging is configured:
            ``logging.basicConfig(level=logging.INFO)``).
        config: a ``CompressConfig``.
        **settings: or its fields as keywords
            (``budget_points=1.0, target="latency"``).

    Returns:
        The trials, the Pareto front, the chosen candidate and its deployable file.

    Raises:
        UserError: bad settings, model, data or folder (before anything runs).
    """
    out = Path(out)
    loaders = {"train": train, "val": val, "test": test}
    cfg = config or compress_config(_loader_settings(settings, train))
    with trusting(trust):  # a file's factory; the candidates' recipes then name it
        section, meta, write_input = _model_section(model, out, factory, factory_kwargs)
    source = str(model) if isinstance(model, str | Path) else "model"
    log = no_log if quiet else LOG.info
    with _data_section(meta, source, data=data, data_dir=data_dir, data_kwargs=data_kwargs,
                       loaders=loaders, class_names=class_names) as data_section:
        cfg, notes = _held_out(cfg, data_section, meta, source, loaders)
        for note in notes:
            log(f"compress: {note}")
        return run_compress(section, data_section, out, cfg, device=device, log=log,
                            notes=notes, module=model if isinstance(model, nn.Module) else None,
                            before_first_write=write_input)


def _loader_settings(settings: dict[str, Any], train: Any) -> dict[str, Any]:
    """``settings`` with the fine-tuning batch size of the user's training loader, unless
    they set one."""
    size = getattr(train, "batch_size", None)
    if "batch_size" in settings or not isinstance(size, int) or size <= 0:
        return settings
    return {**settings, "batch_size": size}


@contextlib.contextmanager
def _data_section(meta: dict, source: str, *, data: str | None, data_dir: str | Path | None,
                  data_kwargs: dict[str, Any] | None, loaders: dict[str, Any],
                  class_names: list[str] | None) -> Iterator[dict[str, Any]]:
    """The candidates' recipe data section: a dataset's or a factory's, or the user's
    loaders held in this process for the duration of the search.

    Raises:
        UserError: both a dataset and loaders, a missing split, or data that is not.
    """
    if all(v is None for v in loaders.values()):
        name = data or meta.get("dataset")
        if name is None:
            raise UserError("the model file does not say its dataset; pass data=NAME, a "
                            "data factory data='pkg.mod:fn', or train=/val=/test= loaders")
        section = data_source(name, kwargs=data_kwargs, root=data_dir,
                              named_by_file=data is None, where=source)
        if meta.get("image_size"):
            section["image_size"] = meta["image_size"]
        yield section
        return
    if data is not None or data_dir is not None or data_kwargs:
        raise UserError("give data= (a dataset or a data factory) or the loaders train=, "
                        "val=, test=, not both")
    missing = [k for k in ("train", "test") if loaders[k] is None]
    if missing:
        raise UserError(f"compress fine-tunes on train= and reports on test=: give "
                        f"{' and '.join(m + '=' for m in missing)} too (val= decides; "
                        "without it val_size images are held out of train=)")
    names = class_names or meta.get("class_names")
    with in_memory_source({**loaders, "class_names": names},
                          where="netshrink.compress") as section:
        yield section


def _held_out(cfg: CompressConfig, section: dict[str, Any], meta: dict, source: str,
              loaders: dict[str, Any]) -> tuple[CompressConfig, list[str]]:
    """Which images decide: the split the model file's run held out, where the data is
    the one it was trained on (see ``held_out_split``); the user's ``val=``; or images
    held out of ``train=``, which the model may have been trained on."""
    if loaders["train"] is None:
        same = section.get("name", section.get("factory")) == meta.get("dataset")
        split = meta.get("split") if "name" in section or same else None
        return held_out_split(cfg, section, split, source=source)
    if loaders["val"] is not None:
        return cfg, ["deciding on val= (never fine-tuned on), reporting on test="]
    return cfg, [f"deciding on {cfg.val_size:,} images held out of train= (the candidates "
                 "are not fine-tuned on them; if the model was trained on them, its "
                 "validation top-1 overstates it: pass val= to decide on images it never "
                 "saw)"]


def study(spec: str | Path | dict[str, Any], out: str | Path, *, db: str | Path | None = None,
          workers: int = 1, quiet: bool = False) -> StudyOutcome:
    """Run or resume a study (a YAML file or a dict) into ``out``; see ``netshrink.study``.
    Progress goes to the ``netshrink`` loggers (``quiet``: nowhere)."""
    parsed = load_study(Path(spec)) if isinstance(spec, (str, Path)) else parse_study(spec)
    return run_study(parsed, Path(out), db=Path(db) if db else None, workers=workers,
                     log=no_log if quiet else LOG.info)
