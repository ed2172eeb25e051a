"""Searches from Python: ``netshrink.compress`` (the smallest or fastest deployable file
within an accuracy budget) and ``netshrink.study`` (a matrix of recipes), as the
``netshrink compress`` and ``netshrink study`` commands run them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from netshrink.compress import CompressConfig, CompressResult
from netshrink.compress import compress as run_compress
from netshrink.compress.options import compress_config, held_out_split
from netshrink.errors import UserError
from netshrink.models import ModelSpec, custom_spec
from netshrink.models.factory import Trust, check_factory, trusting
from netshrink.stages.start import section_of
from netshrink.store.checkpoint import load_model, save_model
from netshrink.store.walls import make_dirs
from netshrink.study import StudyOutcome, load_study, parse_study, run_study

__all__ = ["compress", "study"]


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
             data_dir: str | Path | None = None, config: CompressConfig | None = None,
             device: str = "cpu", quiet: bool = False, factory: str | None = None,
             factory_kwargs: dict[str, Any] | None = None, trust: Trust = (),
             **settings: Any) -> CompressResult:
    """Search channel pruning, sparsity, k-means sharing or INT8 on ``model`` for the
    smallest (``target="size"``) or fastest (``"latency"``) deployable file within
    ``budget_points`` of top-1 on a held-out validation split.

    Args:
        model: a model file netshrink reads, or a model it built.
        out: the search's folder (candidates, results store, report, ``chosen/``).
        data: a registered dataset's name (default: the one the model file names).
        data_dir: where its files are (default: the dataset's usual place).
        factory / factory_kwargs: for the user's own module, the function that builds
            it (``package.module:function``) and its arguments; trusted for the search.
        trust: factories a model file may name (``netshrink.load``'s ``trust``).
        config / settings: a ``CompressConfig``, or its fields as keywords
            (``budget_points=1.0, target="latency"``).

    Returns:
        The trials, the Pareto front, the chosen candidate and its deployable file.

    Raises:
        UserError: bad settings, model, data or folder (before anything runs).
    """
    out = Path(out)
    cfg = config or compress_config(settings)
    with trusting(trust):  # a file's factory; the candidates' recipes then name it
        section, meta, write_input = _model_section(model, out, factory, factory_kwargs)
    dataset = data or meta.get("dataset")
    if dataset is None:
        raise UserError("the model file does not say its dataset; pass data=NAME")
    data_section: dict[str, Any] = {"name": dataset,
                                    "root": str(data_dir) if data_dir else None}
    if meta.get("image_size"):
        data_section["image_size"] = meta["image_size"]
    cfg, notes = held_out_split(cfg, data_section, meta.get("split"),
                                source=str(model) if isinstance(model, str | Path) else "model")
    log = (lambda _: None) if quiet else print
    for note in notes:
        log(f"compress: {note}")
    return run_compress(section, data_section, out, cfg, device=device, log=log, notes=notes,
                        module=model if isinstance(model, nn.Module) else None,
                        before_first_write=write_input)


def study(spec: str | Path | dict[str, Any], out: str | Path, *, db: str | Path | None = None,
          workers: int = 1, quiet: bool = False) -> StudyOutcome:
    """Run or resume a study (a YAML file or a dict) into ``out``; see ``netshrink.study``."""
    parsed = load_study(Path(spec)) if isinstance(spec, (str, Path)) else parse_study(spec)
    return run_study(parsed, Path(out), db=Path(db) if db else None, workers=workers,
                     log=(lambda _: None) if quiet else print)
