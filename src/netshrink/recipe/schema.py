"""The recipe: a YAML file naming a model, data and a list of stages, validated up front.

Every section refuses unknown keys, and every stage is checked against its own config
class before anything runs, so a typo in the last stage fails in the first second with
the list of what is allowed, not an hour into training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from netshrink.bench.options import MeasureConfig
from netshrink.data import DataConfig
from netshrink.errors import UserError
from netshrink.limits import MAX_SEED
from netshrink.models.factory import check_factory
from netshrink.stages.base import STAGES, load_builtin_stages
from netshrink.stages.start import ModelSection
from netshrink.store.layout import check_name

# A recipe is a page of YAML: these bound what a hostile one can make the parser build.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 32
# A recipe chains a handful of stages (the shipped ones have at most a dozen). The runner
# rewrites run.json after every stage, so its work grows with the square of the count: a
# list of thousands is a mistake (or a hostile file), refused before anything runs.
MAX_RECIPE_STAGES = 256
# libyaml's safe loader where PyYAML was built with it (10x faster on a large file; the
# same documents), else the pure-Python one: both build plain data only.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ReportConfig(BaseModel):
    """The ``report:`` section: what the report compares with, and how strictly.

    ``baseline`` names the stage every row is compared with (ratios, top-1 changes,
    verdicts, plots): ``baseline`` or any stage's name. Default: the ``baseline`` stage if
    it was evaluated (has an accuracy), else the first stage whose measurement has one,
    i.e. the trained model of a recipe that starts from a fresh init.
    """

    model_config = ConfigDict(extra="forbid")

    accuracy_budget: float | None = Field(default=None, ge=0)  # top-1 points vs the reference
    baseline: str | None = None  # the reference stage's name; None: the rule above


def stage_refs(value: Any) -> list[str]:
    """Names of other stages a config reads (``teacher_stage``, ``student_stage``),
    anywhere in it."""
    if not isinstance(value, BaseModel):
        return []
    refs = [getattr(value, f) for f in ("teacher_stage", "student_stage")
            if getattr(value, f, None)]
    for name in type(value).model_fields:
        refs += stage_refs(getattr(value, name))
    return refs


class StageEntry(BaseModel):
    """One validated stage: its kind, unique name, typed config, and the stage whose
    model it starts from (``from:``; None: the previous stage that left a torch model)."""

    kind: str
    name: str
    config: Any
    source: str | None = None


class Recipe(BaseModel):
    """A whole recipe. ``stages`` is a list of ``{kind: ..., name?: ..., from?: ...,
    <config keys>}``.

    Each stage starts from the model of the stage before it that left a torch model
    (exports and quantizations do not), or from the stage named by ``from:``: several
    stages ``from: train`` compare methods or ratios on one trained model (a study),
    and the stages after a ``from:`` stage continue its branch.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # auto: cuda when torch sees a GPU
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataConfig = Field(default_factory=DataConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    stages: list[dict[str, Any]] = Field(default_factory=list)
    # The user's model factories (package.module:function) the recipe's files may name
    # (a teacher or weights saved with their factory); model.factory is trusted anyway.
    trust: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("trust")
    @classmethod
    def _import_paths(cls, names: list[str]) -> list[str]:
        for name in names:
            try:
                check_factory(name, "trust:")
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return names

    def trusted(self) -> list[str]:
        """The factories this recipe's runs may call: its ``trust`` list and every
        factory its model sections name (``model:``, a distillation's ``student:``)."""
        sections = [self.model, *(getattr(e.config, "student", None)
                                  for e in self.parsed_stages())]
        return [*self.trust, *(s.factory for s in sections
                               if isinstance(s, ModelSection) and s.factory)]

    @model_validator(mode="after")
    def _check_stages(self) -> Recipe:
        if len(self.stages) > MAX_RECIPE_STAGES:
            raise ValueError(
                f"stages: {len(self.stages):,} stages, more than the {MAX_RECIPE_STAGES} a "
                "recipe may have; split the work into several recipes, or a study")
        entries = self.parsed_stages()
        reference = self.report.baseline
        names = ["baseline", *(e.name for e in entries)]
        if reference is not None and reference not in names:
            raise ValueError(
                f"report.baseline: {reference!r} is not a stage of this recipe; name the "
                f"stage to compare with, one of: {', '.join(names)} (or leave it out)")
        return self

    def parsed_stages(self) -> list[StageEntry]:
        load_builtin_stages()
        entries: list[StageEntry] = []
        seen: set[str] = {"baseline"}
        models: set[str] = {"baseline"}  # stages that leave a torch model a stage can start from
        for i, raw in enumerate(self.stages):
            if not isinstance(raw, dict) or "kind" not in raw:
                raise ValueError(f"stages[{i}] needs a 'kind' (one of: {', '.join(STAGES)})")
            body = dict(raw)
            kind = str(body.pop("kind"))
            if kind not in STAGES:
                raise ValueError(
                    f"stages[{i}]: unknown stage kind {kind!r}; known: {', '.join(STAGES)}"
                )
            name = str(body.pop("name", kind))
            try:
                check_name(name, f"stages[{i}] ({kind}): name")
            except UserError as exc:
                raise ValueError(str(exc)) from None
            if name in seen:
                raise ValueError(f"stages[{i}]: stage name {name!r} is used twice; "
                                 "give each stage a unique 'name'")
            seen.add(name)
            source = body.pop("from", None)
            if source is not None and str(source) not in models:
                raise ValueError(
                    f"stages[{i}] ({kind}): from: {source!r} is not an earlier stage that "
                    f"leaves a torch model; one of: {', '.join(sorted(models))}")
            cls = STAGES.get(kind).config
            try:
                config = cls.model_validate(body)
            except ValidationError as exc:
                raise ValueError(f"stages[{i}] ({kind}): {_first_error(exc, cls)}") from None
            for ref in stage_refs(config):
                if ref not in models:
                    raise ValueError(
                        f"stages[{i}] ({kind}): {ref!r} is not an earlier stage that leaves a "
                        f"torch model; one of: {', '.join(sorted(models))}")
            if STAGES.get(kind).chains:
                models.add(name)
            entries.append(StageEntry(kind=kind, name=name, config=config,
                                      source=None if source is None else str(source)))
        return entries


def _first_error(exc: ValidationError, cls: type[BaseModel] | None = None) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = f"; allowed: {', '.join(cls.model_fields)}" if cls is not None else ""
        return f"unknown key {where!r}{allowed}"
    got = repr(err.get("input"))
    if len(got) > 120:  # an error names the value, not a whole section of the recipe
        got = got[:117] + "..."
    return f"{where}: {err['msg']} (got {got})"


def _section_class(loc: tuple) -> type[BaseModel] | None:
    sections = {"model": ModelSection, "data": DataConfig, "measure": MeasureConfig,
                "report": ReportConfig}
    if len(loc) > 1:
        return sections.get(str(loc[0]))
    return Recipe


def _non_finite(value: Any, where: str = "") -> str | None:
    """The place of the first inf/NaN number anywhere in ``value`` (YAML's ``.inf`` and
    ``.nan`` are numbers to pydantic, and a learning rate of inf trains a NaN model)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(top level)"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        key = str(key)
        found = _non_finite(item, f"{where}{key}" if key.startswith("[") or not where
                            else f"{where}.{key}")
        if found is not None:
            return found
    return None


def parse_recipe(raw: Any, *, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict.

    Raises:
        UserError: an unknown key or stage, or a value out of range, named with its place.
    """
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping with model/data/stages keys")
    where = _non_finite(raw)
    if where is not None:
        raise UserError(f"{source}: {where}: not a finite number; give a finite value")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "value_error":
            raise UserError(f"{source}: {str(err['msg']).removeprefix('Value error, ')}") from None
        raise UserError(f"{source}: {_first_error(exc, _section_class(err['loc']))}") from None


def _check_yaml_shape(text: str, path: Path) -> None:
    """Refuse aliases and deep nesting before anything is built: an alias repeats a
    node without costing bytes, so nested ones (``a: [*b, *b, ...]`` nine per level)
    expand a few hundred bytes into gigabytes wherever the structure is walked."""
    depth = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise UserError(f"{path}: YAML aliases (*{event.anchor}) are not accepted in "
                            "recipes; write the values out")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_RECIPE_DEPTH:
                raise UserError(f"{path}: nested more than {MAX_RECIPE_DEPTH} levels deep; "
                                "a recipe is a few levels of mappings and lists")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def read_yaml(path: Path, what: str = "recipe") -> Any:
    """The YAML document in ``path``, read with every bound a recipe has.

    Raises:
        UserError: missing file, not a regular file, too large, not UTF-8, or invalid or
            hostile YAML (aliases, deep nesting).
    """
    try:
        if not path.is_file():
            state = "is a folder" if path.is_dir() else (
                "not found" if not path.exists() else "not a regular file")
            raise UserError(f"{path}: {what} {state}; give the {what}'s .yaml file")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes is too large for a "
                            f"{what} (at most {MAX_RECIPE_BYTES:,}); is it the right file?")
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as "
                        "UTF-8") from None
    try:
        _check_yaml_shape(text, path)
        return yaml.load(text, Loader=_LOADER)  # a safe loader: plain data only
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0][:200]})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a {what}") from None
    except ValueError as exc:  # an integer of more than 4,300 digits (Python's own bound)
        raise UserError(f"{path}: not a {what} netshrink reads "
                        f"({str(exc).splitlines()[0][:160]})") from None


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file.

    Raises:
        UserError: missing file, not a regular file, too large, not UTF-8, invalid or
            hostile YAML (aliases, deep nesting), or an invalid recipe.
    """
    return parse_recipe(read_yaml(path), source=str(path))
