"""Recipes: every shipped recipe validates; mistakes are named with what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from doc_pages import section
from netshrink.errors import UserError
from netshrink.recipe import load_recipe, parse_recipe
from netshrink.recipe.runner import stage_keys
from netshrink.recipe.schema import StageEntry
from netshrink.stages.base import STAGES

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_shipped_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    entries = recipe.parsed_stages()
    assert entries, "a shipped recipe should do something"


# --- the reference-study recipes (recipes/study_*.yaml) ----------------------------------

STUDIES = [p for p in RECIPES if p.name.startswith("study_")]


def lineage(entries: list[StageEntry]) -> dict[str, list[StageEntry]]:
    """Each stage's chain of torch models back to the baseline, nearest first: the stage
    named by its ``from:``, else the latest earlier stage that leaves a torch model."""
    chains: dict[str, list[StageEntry]] = {"baseline": []}
    last = "baseline"
    for entry in entries:
        source = entry.source or last
        src_entry = next((e for e in entries if e.name == source), None)
        chains[entry.name] = ([src_entry] if src_entry else []) + chains[source]
        if STAGES.get(entry.kind).chains:
            last = entry.name
    return chains


def study_stages() -> list[tuple[Path, StageEntry, list[StageEntry]]]:
    rows = []
    for path in STUDIES:
        entries = load_recipe(path).parsed_stages()
        chains = lineage(entries)
        rows += [(path, e, chains[e.name]) for e in entries]
    return rows


def test_there_is_a_recipe_per_reference_study() -> None:
    assert len(STUDIES) >= 5, [p.name for p in STUDIES]


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_recipe_is_documented_and_branches_from_its_trained_model(path: Path) -> None:
    text = path.read_text()
    header = text.split("\nname:", 1)[0]
    assert header.startswith("# Reproduces reference study"), "say which study it reproduces"
    assert f"netshrink run recipes/{path.name} --out " in header, "give the command"
    assert "Data:" in header and "--data-dir" in header, "say what data it expects"
    raw = yaml.safe_load(text)
    assert all("name" in stage for stage in raw["stages"]), "name every stage"
    entries = load_recipe(path).parsed_stages()
    assert entries[0].kind == "train", "a study trains its baseline first"
    for entry, chain in ((e, lineage(entries)[e.name]) for e in entries[1:]):
        # Every method is applied to the trained model, never to the fresh baseline.
        assert entries[0] in chain, f"{entry.name} does not start from {entries[0].name}"


def test_study_recipes_cover_every_method_of_the_studies() -> None:
    rows = study_stages()

    def has(kind: str, test=lambda c: True, after: str | None = None) -> bool:
        return any(e.kind == kind and test(e.config)
                   and (after is None or any(a.kind == after for a in chain))
                   for _, e, chain in rows)

    archs = {load_recipe(p).model.arch for p in STUDIES}
    archs |= {e.config.student.arch for _, e, _ in rows
              if e.kind == "distill.kd" and e.config.student is not None}
    assert {"resnet18", "resnet50"} <= archs
    for kind in ("prune.magnitude", "prune.channel"):
        oneshot = {e.config.ratio for _, e, _ in rows if e.kind == kind and e.config.steps == 1}
        iterative = {e.config.ratio for _, e, _ in rows if e.kind == kind and e.config.steps > 1}
        assert len(iterative) >= 3 and iterative <= oneshot, kind  # same ratios both ways
        if kind == "prune.magnitude":
            assert {0.5, 0.75, 0.9} <= iterative
    assert has("prune.nm", lambda c: (c.n, c.m) == (2, 4))
    assert has("quant.ptq", lambda c: not c.per_channel)
    assert has("quant.ptq", lambda c: c.per_channel)
    assert has("quant.ptq", lambda c: c.keep_float == ["fc"])  # mixed precision
    assert has("quant.qat")
    assert has("quant.kmeans", lambda c: c.bits == 8)  # 256 shared values
    assert has("distill.kd", lambda c: c.student is not None and c.alpha < 1)  # from scratch
    assert has("distill.kd", lambda c: c.student_stage is not None)  # from a trained student
    assert has("distill.kd", lambda c: c.alpha == 1.0)  # the no-teacher control
    assert has("finetune", lambda c: c.distill is not None, after="prune.channel")
    assert has("quant.ptq", after="distill.kd")  # distill + quantize
    assert has("quant.kmeans", after="distill.kd")
    assert has("quant.qat", after="distill.kd")
    assert has("export.onnx", after="distill.kd")  # distill + export


def test_study_kd_controls_match_the_distilled_student() -> None:
    """A fresh student distilled with a teacher has an alpha-1 twin: the same student,
    training options and seed, so the two differ only by the teacher."""
    teacher_only = {"alpha", "temperature", "teacher", "teacher_stage"}
    for path in STUDIES:
        kd = [e for e in load_recipe(path).parsed_stages()
              if e.kind == "distill.kd" and e.config.student is not None]
        for student in (e for e in kd if e.config.alpha < 1):
            want = student.config.model_dump(exclude=teacher_only)
            assert any(c.config.alpha == 1.0 and c.source == student.source
                       and c.config.model_dump(exclude=teacher_only) == want for c in kd), \
                f"{path.name}: {student.name} has no alpha-1 control"


@pytest.mark.parametrize("first,second", [
    ("quickstart.yaml", "study_kd_prune_ptq.yaml"),
    ("study_r18_r50_compression_r50.yaml", "study_r18_r50_compression_r18.yaml"),
])
def test_study_recipes_share_their_trained_model(first: str, second: str) -> None:
    """Recipes whose comments say they train the same model do: its key is the same, so
    the shared model cache trains it once."""
    keys = []
    for name in (first, second):
        recipe = load_recipe(RECIPES[0].parent / name)
        keys.append(stage_keys(recipe, recipe.parsed_stages())[1])
    assert keys[0] == keys[1]


@pytest.mark.parametrize("name,teacher,student", [
    ("study_kd_prune_ptq.yaml", "r50-teacher", "r18-kd"),
    ("fashion_compress.yaml", "teacher", "student"),
])
def test_quickstart_teacher_and_student_serve_later_recipes(name: str, teacher: str,
                                                            student: str) -> None:
    """The KD study's and the compress recipe's teacher and distilled student are the
    quickstart's, stage for stage: after the quickstart only their later stages are
    computed."""
    def keys(name: str) -> dict[str, str]:
        recipe = load_recipe(RECIPES[0].parent / name)
        entries = recipe.parsed_stages()
        return dict(zip(["baseline"] + [e.name for e in entries],
                        stage_keys(recipe, entries), strict=True))

    quick, later = keys("quickstart.yaml"), keys(name)
    assert quick["teacher"] == later[teacher]
    assert quick["student"] == later[student]


def test_readme_lists_every_study_recipe() -> None:
    """The "Reference studies" section (README.md or a docs page) names every study."""
    page, text = section("Reference studies")
    for path in STUDIES:
        assert f"recipes/{path.name}" in text, (page.name, path.name)


def minimal(**changes) -> dict:
    raw = {"model": {"arch": "resnet_tiny"}, "data": {"name": "fashion_mnist"},
           "stages": [{"kind": "train", "epochs": 1}]}
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    "raw,message",
    [
        (minimal(modle={}), r"unknown key 'modle'; allowed: name, seed, device, model"),
        (minimal(data={"nmae": "x"}), r"unknown key 'data.nmae'; allowed: name, root"),
        (minimal(stages=[{"kind": "train", "epoch": 3}]),
         r"stages\[0\] \(train\): unknown key 'epoch'; allowed: epochs, max_steps"),
        (minimal(stages=[{"kind": "prune.magic"}]),
         r"unknown stage kind 'prune.magic'; known: compress, deploy.torch, distill.kd, "
         r"export.onnx, export.tensorrt, finetune, "
         r".*prune\.magnitude.*, quant\.ptq.*, train$"),
        (minimal(stages=[{"epochs": 3}]), r"stages\[0\] needs a 'kind'"),
        (minimal(stages=[{"kind": "train", "epochs": -1}]),
         r"stages\[0\] \(train\): epochs: Input should be greater than 0 \(got -1\)"),
        (minimal(stages=[{"kind": "train"}, {"kind": "train"}]), r"'train' is used twice"),
        (minimal(device="tpu"), r"device: Input should be 'cpu', 'cuda' or 'auto'"),
        (minimal(report={"baseline": "teacher"}),
         r"report\.baseline: 'teacher' is not a stage of this recipe; name the stage to "
         r"compare with, one of: baseline, train \(or leave it out\)"),
        (minimal(report={"baseline": "train", "budget": 1}),
         r"unknown key 'report\.budget'; allowed: accuracy_budget, baseline"),
        ([1, 2], r"a recipe is a YAML mapping"),
    ],
)
def test_bad_recipes_are_named(raw, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_recipe(raw)


@pytest.mark.parametrize("reference", ["baseline", "train", "int8"])
def test_report_baseline_names_any_stage(reference: str) -> None:
    raw = minimal(stages=[{"kind": "train", "epochs": 1},
                          {"kind": "quant.ptq", "name": "int8"}],
                  report={"baseline": reference})
    assert parse_recipe(raw).report.baseline == reference
    assert parse_recipe(minimal()).report.baseline is None


def test_bad_yaml_and_missing_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
