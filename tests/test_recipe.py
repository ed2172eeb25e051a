"""Recipes: every shipped recipe validates; mistakes are named with what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from netshrink.errors import UserError
from netshrink.recipe import load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_shipped_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.parsed_stages(), "a shipped recipe should do something"


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
         r"unknown stage kind 'prune.magic'; known: distill.kd, export.onnx, finetune, "
         r".*prune\.magnitude.*, quant\.ptq.*, train$"),
        (minimal(stages=[{"epochs": 3}]), r"stages\[0\] needs a 'kind'"),
        (minimal(stages=[{"kind": "train", "epochs": -1}]),
         r"stages\[0\] \(train\): epochs: Input should be greater than 0 \(got -1\)"),
        (minimal(stages=[{"kind": "train"}, {"kind": "train"}]), r"'train' is used twice"),
        (minimal(device="tpu"), r"device: Input should be 'cpu' or 'cuda'"),
        ([1, 2], r"a recipe is a YAML mapping"),
    ],
)
def test_bad_recipes_are_named(raw, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_recipe(raw)


def test_bad_yaml_and_missing_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
