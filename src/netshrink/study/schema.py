"""A study file: one recipe's common part and a matrix of axes; each combination of one
value per axis is a cell, itself a whole recipe.

    name: finegrained-vs-channel
    recipe:                    # what every cell shares (model, data, measure, stages)
      model: {arch: resnet18}
      stages:
        - {kind: train, name: train, epochs: 2}
    matrix:
      method:                  # a named value adds stages and/or sets recipe keys
        fine: {stages: [{kind: prune.magnitude, name: prune, from: train, ratio: ${ratio}}]}
        channel: {stages: [{kind: prune.channel, name: prune, from: train, ratio: ${ratio}}]}
      ratio: [0.1, 0.3, 0.5]   # plain values are substituted where ${ratio} is written
    exclude:
      - {method: fine, ratio: 0.1}

``${axis}`` standing alone keeps the value's type (``ratio: ${ratio}`` is a number);
inside a longer string it is spliced in as text. A named value's ``set`` is merged into
the recipe (``set: {model: {arch: resnet50}}``), its ``stages`` appended in axis order.
Two cells whose recipes come out identical are one cell (a ratio axis that a dense
method ignores), so nothing is run or stored twice. Every cell is validated as a recipe
before the first one runs.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from netshrink.errors import UserError
from netshrink.limits import env_bound
from netshrink.recipe.keys import sha
from netshrink.recipe.schema import Recipe, parse_recipe, read_yaml
from netshrink.store.layout import check_name

MAX_CELLS = 1000  # a study is a grid someone reads; more is a typo in an axis
# Every cell's recipe is held in memory at once and written into study.json: their JSON
# together may take this much (a real cell's recipe is 1-2 KB: 1,000 cells take 2 MB).
STUDY_MB_ENV = "NETSHRINK_STUDY_MB"
STUDY_MB_DEFAULT = 16
RECIPE_DEFAULTS_BYTES = 1024  # what a recipe's defaults add to its JSON (model, data...)
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_]+)\}")
Scalar = str | int | float | bool


class AxisValue(BaseModel):
    """A named value of an axis: recipe keys it sets and stages it appends."""

    model_config = ConfigDict(extra="forbid")

    set: dict[str, Any] = Field(default_factory=dict)
    stages: list[dict[str, Any]] = Field(default_factory=list)


class StudyReport(BaseModel):
    """The ``report:`` section of a study: the budget and the reference of its report."""

    model_config = ConfigDict(extra="forbid")

    accuracy_budget: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # ``stage`` (shared by every cell) or ``cell/stage``; None: the first evaluated stage
    baseline: str | None = None


class StudyFile(BaseModel):
    """The study file as written."""

    model_config = ConfigDict(extra="forbid")

    name: str
    recipe: dict[str, Any] = Field(default_factory=dict)
    matrix: dict[str, list[Any] | dict[str, Any]]  # checked axis by axis (_axis_items)
    exclude: list[dict[str, Scalar]] = Field(default_factory=list)
    report: StudyReport = Field(default_factory=StudyReport)


@dataclass(frozen=True)
class Cell:
    """One combination: its name (the axis labels joined by ``-``), the label chosen on
    each axis, and its validated recipe."""

    name: str
    axes: dict[str, str]
    recipe: Recipe

    @functools.cached_property
    def recipe_sha256(self) -> str:
        """The hash a run of this recipe records (``run.json``'s ``recipe_sha256``);
        computed once (a 1,000-cell study asks for it several times per cell)."""
        return sha(self.recipe.model_dump(mode="json"))


@dataclass(frozen=True)
class Study:
    """A validated study: its file and its cells, in matrix order."""

    name: str
    spec: StudyFile
    cells: tuple[Cell, ...]
    merged: dict[str, list[str]]  # a cell left out as identical to another -> its labels


def max_study_bytes() -> int:
    """The bytes of JSON a study's cells' recipes may take together (``$NETSHRINK_STUDY_MB``
    megabytes; ``study.json``, which holds them, may take twice that)."""
    return env_bound(STUDY_MB_ENV, STUDY_MB_DEFAULT, most=1 << 20, unit="megabytes") << 20


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, mappings key by key (``extra`` wins). Values are
    not copied: ``_substitute`` rebuilds every container of a cell's recipe afterwards."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, default=str, separators=(",", ":")))


def _placeholders(value: Any) -> int:
    """How many ``${axis}`` a value holds, anywhere in it."""
    if isinstance(value, dict):
        return sum(_placeholders(v) for v in value.values())
    if isinstance(value, list):
        return sum(_placeholders(v) for v in value)
    return len(_PLACEHOLDER.findall(value)) if isinstance(value, str) else 0


def _check_expansion(spec: StudyFile, items: dict[str, list[tuple[str, Scalar, AxisValue]]],
                     combinations: int, source: str) -> None:
    """Refuse, before expanding, a matrix whose cells' recipes would take more than the
    bound: each cell holds the shared recipe, one value of each axis, and every
    placeholder replaced by a label (at most 80 characters)."""
    per_cell = RECIPE_DEFAULTS_BYTES + _json_bytes(spec.recipe)
    holes = _placeholders(spec.recipe)
    longest = 0
    for axis in items.values():
        per_cell += max(_json_bytes(added.set) + _json_bytes(added.stages)
                        for _, _, added in axis)
        holes += max(_placeholders(added.set) + _placeholders(added.stages)
                     for _, _, added in axis)
        longest = max(longest, *(len(label) for label, _, _ in axis))
    per_cell += holes * longest
    total, bound = combinations * per_cell, max_study_bytes()
    if total > bound:
        raise UserError(
            f"{source}: {combinations:,} cells of up to {per_cell:,} bytes of recipe each "
            f"make {total / 1e6:,.1f} MB of recipes, more than the {bound >> 20:,} MB a study "
            "may expand to (every cell's recipe is held in memory and kept in study.json); "
            "shorten the shared recipe or the matrix, or raise the bound with "
            f"${STUDY_MB_ENV}=MEGABYTES")


def _substitute(value: Any, values: dict[str, Scalar], where: str) -> Any:
    """``value`` with every ``${axis}`` replaced (see the module docstring)."""
    if isinstance(value, dict):
        return {k: _substitute(v, values, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values, where) for v in value]
    if not isinstance(value, str):
        return value
    for name in _PLACEHOLDER.findall(value):
        if name not in values:
            raise UserError(f"{where}: ${{{name}}} names no axis of the matrix; axes: "
                            f"{', '.join(values)}")
    whole = _PLACEHOLDER.fullmatch(value)
    if whole is not None:
        return values[whole.group(1)]
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), value)


def _named_value(axis: str, label: str, raw: Any) -> AxisValue:
    try:
        return AxisValue.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        what = (f"unknown key {where!r}; a named value has: set, stages"
                if err["type"] == "extra_forbidden" else f"{where}: {err['msg']}")
        raise UserError(f"matrix.{axis}.{label}: {what}") from None


def _axis_items(axis: str, values: list[Any] | dict[str, Any]
                ) -> list[tuple[str, Scalar, AxisValue]]:
    """``(label, value substituted for ${axis}, what it adds)`` for each value."""
    if not values:
        raise UserError(f"matrix.{axis}: an axis needs at least one value")
    if isinstance(values, dict):
        items = [(str(label), str(label), _named_value(axis, str(label), raw))
                 for label, raw in values.items()]
    else:
        for v in values:
            if not isinstance(v, (str, int, float, bool)):
                raise UserError(f"matrix.{axis}: {v!r} is not a plain value; list numbers "
                                "or words, or name each value (name: {set:, stages:})")
        items = [(json.dumps(v) if isinstance(v, bool) else str(v), v, AxisValue())
                 for v in values]
    labels = [label for label, _, _ in items]
    if len(set(labels)) != len(labels):
        raise UserError(f"matrix.{axis}: a value is listed twice ({labels})")
    for label in labels:
        check_name(label, f"matrix.{axis}: value")
    return items


def _excluded(labels: dict[str, str], exclude: list[dict[str, str]]) -> bool:
    return any(all(labels[a] == v for a, v in rule.items()) for rule in exclude)


def _check_exclude(spec: StudyFile, items: dict[str, list[tuple[str, Scalar, AxisValue]]]
                   ) -> list[dict[str, str]]:
    rules = []
    for i, rule in enumerate(spec.exclude):
        for axis, value in rule.items():
            if axis not in items:
                raise UserError(f"exclude[{i}]: {axis!r} is not an axis; axes: "
                                f"{', '.join(items)}")
            labels = [label for label, _, _ in items[axis]]
            if str(value) not in labels and json.dumps(value) not in labels:
                raise UserError(f"exclude[{i}]: {axis}={value!r} is not a value of that "
                                f"axis; values: {', '.join(labels)}")
        rules.append({a: (str(v) if str(v) in [x for x, _, _ in items[a]] else json.dumps(v))
                      for a, v in rule.items()})
    return rules


def _stage_list(stages: Any, where: str) -> list[Any]:
    if stages is None:
        return []
    if not isinstance(stages, list):
        raise UserError(f"{where}: recipe.stages is {type(stages).__name__}, not a list of "
                        "stages; write stages: [...]")
    return stages


def expand(spec: StudyFile, source: str = "study") -> Study:
    """The cells of ``spec``, each validated as a recipe.

    Raises:
        UserError: an unknown placeholder, axis or value; a cell that is not a valid
            recipe (named with its cell); too many cells.
    """
    check_name(spec.name, f"{source}: name")
    items = {axis: _axis_items(axis, values) for axis, values in spec.matrix.items()}
    if not items:
        raise UserError(f"{source}: matrix has no axes; give at least one")
    for axis in items:
        check_name(axis, f"{source}: matrix axis")
    combinations = math.prod(len(v) for v in items.values())
    if combinations > MAX_CELLS:
        raise UserError(f"{source}: the matrix has {combinations:,} combinations, more than "
                        f"{MAX_CELLS} cells; is an axis too long?")
    _check_expansion(spec, items, combinations, source)
    rules = _check_exclude(spec, items)
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    merged: dict[str, list[str]] = {}
    for combo in itertools.product(*items.values()):
        labels = {axis: label for axis, (label, _, _) in zip(items, combo, strict=True)}
        if _excluded(labels, rules):
            continue
        name = "-".join(labels.values())
        where = f"{source}: cell {name}"
        raw = dict(spec.recipe)
        for _, _, added in combo:
            raw = _merge(raw, added.set)
            if added.stages:
                raw["stages"] = [*_stage_list(raw.get("stages"), where), *added.stages]
        values = {axis: value for axis, (_, value, _) in zip(items, combo, strict=True)}
        raw = _substitute(raw, values, where)  # new containers throughout: the cell's own
        raw["name"] = f"{spec.name}.{name}"
        recipe = parse_recipe(raw, source=where)
        dumped = recipe.model_dump(mode="json")
        body = sha({k: v for k, v in dumped.items() if k != "name"})
        if body in seen:
            merged.setdefault(seen[body], []).append(name)
            continue
        seen[body] = name
        cell = Cell(name=check_name(name, f"{source}: cell name"), axes=labels, recipe=recipe)
        cell.__dict__["recipe_sha256"] = sha(dumped)  # the cached property, from this dump
        cells.append(cell)
    if not cells:
        raise UserError(f"{source}: every cell is excluded; nothing to run")
    return Study(name=spec.name, spec=spec, cells=tuple(cells), merged=merged)


def parse_study(raw: Any, source: str = "study") -> Study:
    """Validate a study given as a mapping and expand it into its cells.

    Raises:
        UserError: what is wrong, with its place.
    """
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a study is a YAML mapping with name, recipe and matrix")
    try:
        spec = StudyFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            raise UserError(f"{source}: unknown key {where!r}; a study has: "
                            f"{', '.join(StudyFile.model_fields)}; a named axis value has: "
                            "set, stages") from None
        raise UserError(f"{source}: {where}: {err['msg']}") from None
    return expand(spec, source)


def load_study(path: Path) -> Study:
    """Read, validate and expand a study file (the bounds a recipe file has).

    Raises:
        UserError: an unreadable or invalid study, or a cell that is not a valid recipe.
    """
    return parse_study(read_yaml(path, "study"), source=str(path))
