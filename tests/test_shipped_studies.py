"""Every shipped study (recipes/studies/*.yaml) expands into valid cells and runs, shrunk as
the shipped recipes are (``test_shipped_recipes.shrink``: the same stages and options on a
tiny subset, one optimizer step per training), through the real study runner into a
results store with one row per measured stage of every cell."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from netshrink.study import ResultsStore, load_study, parse_study, run_study
from test_shipped_recipes import shrink

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted((ROOT / "recipes" / "studies").glob("*.yaml"))
CELLS = {  # what each study is: its cells, as the reference study's table has them
    "fashion_finegrained_vs_channel.yaml": 6,  # 2 methods x 3 ratios
    "fashion_oneshot_vs_iterative.yaml": 12,  # 2 structures x 2 schedules x 3 ratios
    "fashion_nm_24.yaml": 4,
    "fashion_quant_prune.yaml": 12,  # 3 prunings x 4 precisions
    "fashion_kd.yaml": 4,  # 2 student starts x with/without the teacher
    "fashion_ptq_qat_kmeans.yaml": 5,
}
# Shrunk, each still takes 20-150 s on 2 busy cores (export, quantization and model files
# per cell): `python -m pytest -m slow tests/test_shipped_studies.py` runs them; the default
# run runs the smallest, fashion_nm_24 (4 cells).
SLOW = {"fashion_oneshot_vs_iterative.yaml", "fashion_quant_prune.yaml", "fashion_kd.yaml",
        "fashion_ptq_qat_kmeans.yaml", "fashion_finegrained_vs_channel.yaml"}
COMMAND = re.compile(r"netshrink study recipes/studies/(\S+\.yaml) --out (\S+)")


def shrink_study(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """The study with its common recipe and every axis value's stages shrunk."""
    raw = copy.deepcopy(raw)
    raw["recipe"] = shrink(raw["recipe"], name)
    for axis, values in raw["matrix"].items():
        if isinstance(values, dict):
            for label, value in values.items():
                if value and value.get("stages"):
                    value["stages"] = shrink({"stages": value["stages"]},
                                             f"{name}: {axis}.{label}")["stages"]
    return raw


def test_every_study_is_listed_and_expands() -> None:
    assert {p.name for p in STUDIES} == set(CELLS)
    for path in STUDIES:
        study = load_study(path)
        assert len(study.cells) == CELLS[path.name], path.name
        header = path.read_text().split("\nname:", 1)[0]
        assert [m.group(1) for m in COMMAND.finditer(header)] == [path.name], path.name


def test_the_studies_share_one_trained_resnet18() -> None:
    from netshrink.recipe.keys import stage_keys

    keys = set()
    for path in STUDIES:
        recipe = load_study(path).cells[0].recipe
        entries = recipe.parsed_stages()
        if entries[0].name == "r18":
            keys.add(stage_keys(recipe, entries)[1])
    assert len(keys) == 1  # one cache entry: trained once for all of them


@pytest.mark.parametrize("path", [pytest.param(
    p, marks=[pytest.mark.slow] if p.name in SLOW else [], id=p.name) for p in STUDIES])
def test_a_shipped_study_runs_shrunk(path: Path, tmp_path: Path) -> None:
    raw = shrink_study(yaml.safe_load(path.read_text()), path.name)
    study = parse_study(raw, source=path.name)
    outcome = run_study(study, tmp_path / "out", log=lambda _: None)
    assert not outcome.failed and len(outcome.ran) == CELLS[path.name]
    with ResultsStore(outcome.db) as store:
        rows = store.rows(study.name)
    expected = sum(len(c.recipe.stages) + 1 for c in study.cells)
    assert len(rows) == expected
    assert all(r["top1"] is not None for r in rows if r["stage_index"] > 0)
    assert (tmp_path / "out" / "report.md").is_file()


def test_the_kd_study_takes_the_quickstarts_teacher_and_student() -> None:
    from netshrink.recipe import load_recipe
    from netshrink.recipe.keys import stage_keys

    def keys(recipe) -> dict[str, str]:
        entries = recipe.parsed_stages()
        names = ["baseline", *(e.name for e in entries)]
        return dict(zip(names, stage_keys(recipe, entries), strict=True))

    quickstart = keys(load_recipe(ROOT / "recipes" / "quickstart.yaml"))
    study = load_study(ROOT / "recipes" / "studies" / "fashion_kd.yaml")
    scratch_kd = keys(next(c for c in study.cells if c.name == "scratch-0.5").recipe)
    assert scratch_kd["teacher"] == quickstart["teacher"]
    assert scratch_kd["student"] == quickstart["student"]
