"""The user's data everywhere: a recipe's ``data: {factory: pkg.mod:fn}`` trains and
measures on the factory's splits, the model cache keys on what the factory returns, a
study's cells and ``netshrink.compress`` take it, and ``netshrink.compress`` takes
DataLoaders directly; a bad factory is one line (exit 2 from the command line)."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import netshrink
from netshrink.cli import main
from netshrink.data import DataConfig, build_data
from netshrink.data.factory import _IN_MEMORY, IN_MEMORY_FACTORY
from netshrink.errors import UserError
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.recipe.keys import stage_keys
from netshrink.store.checkpoint import load_model
from netshrink.study import parse_study, run_study

MODULE = "nsuserdata"  # the user's module, written into a folder on sys.path
FACTORY = f"{MODULE}:data"
SOURCE = '''
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

SHIFT = 0.0  # the tests change it: the same factory and arguments, other data


def images(n, seed, classes=3):
    """Classes a tiny CNN tells apart: a bright centred square whose side is the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.3 + SHIFT
    for i, label in enumerate(y.tolist()):
        side = 4 + 4 * label
        lo = (16 - side) // 2
        x[i, :, lo:lo + side, lo:lo + side] += 2.0
    return TensorDataset(x, y)


class Noisy(Dataset):
    """Random augmentation in __getitem__, as torchvision transforms do."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.01 * torch.randn_like(x), int(y)


def data(n_train=72, n_test=30, val=False, noisy=False):
    train = images(n_train, 0)
    out = {"train": Noisy(train) if noisy else train, "test": images(n_test, 1),
           "class_names": ["small", "mid", "large"]}
    if val:
        out["val"] = images(24, 2)
    return out


def loaders():
    return DataLoader(images(72, 0), batch_size=16, shuffle=True), DataLoader(images(30, 1))


def returns_list():
    return [images(8, 0), images(8, 1)]


def flat_items():
    flat = TensorDataset(torch.zeros(8, 16, 16), torch.zeros(8, dtype=torch.long))
    return {"train": flat, "test": flat}


def same_val_and_test():
    test = images(8, 1)
    return {"train": images(8, 0), "val": test, "test": test}
'''
TRAIN = {"kind": "train", "epochs": 4, "lr": 0.05, "batch_size": 16, "amp": "auto"}
DATA = {"factory": FACTORY, "val_size": 12, "calib_size": 8, "batch_size": 16}


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    sys.path.insert(0, str(folder))  # spawned study workers inherit sys.path
    module = importlib.import_module(MODULE)
    yield module
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


def recipe(**changes: Any) -> dict[str, Any]:
    return {"name": "user-data", "model": {"arch": "resnet_tiny"},
            "data": dict(DATA), "measure": {"latency": False}, "stages": [dict(TRAIN)],
            **changes}


@pytest.fixture(scope="module")
def trained(user_module: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    run_recipe(parse_recipe(recipe()), out, report=False, log=lambda _: None)
    return out


def top1(model: torch.nn.Module, dataset: Any) -> float:
    model.eval()
    with torch.inference_mode():
        x, y = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
        return float((model(torch.stack(x)).argmax(1) == torch.tensor(y)).float().mean())


def test_a_recipe_with_a_data_factory_measures_on_its_test_split(user_module: Any,
                                                                 trained: Path) -> None:
    record = json.loads((trained / "run.json").read_text())
    stage = record["stages"][-1]
    acc = stage["measurement"]["accuracy"]
    assert acc["split"] == "test" and acc["images"] == 30  # the factory's test split
    model, spec, meta = load_model(trained / stage["artifact"])
    assert spec.num_classes == 3 and spec.in_channels == 1
    assert meta["dataset"] == FACTORY and meta["class_names"] == ["small", "mid", "large"]
    assert meta["image_size"] == 16 and meta["split"]["val_size"] == 12
    assert acc["top1"] == pytest.approx(top1(model, user_module.data()["test"]))
    assert acc["top1"] > 0.6  # it learned the factory's classes (chance is 1/3)
    assert record["recipe"]["data"]["factory"] == FACTORY
    assert "name" not in record["recipe"]["data"]


def test_held_out_validation_and_calibration_come_from_train(user_module: Any) -> None:
    data = build_data(DataConfig(factory=FACTORY, val_size=12, calib_size=8))
    assert (len(data.train), len(data.val), len(data.test), len(data.calib)) == (60, 12, 30, 8)
    given = build_data(DataConfig(factory=FACTORY, kwargs={"val": True}, calib_size=8))
    assert (len(given.train), len(given.val), len(given.test)) == (72, 24, 30)
    x, y = next(iter(given.train.batches(16, shuffle=True, seed=3)))
    assert x.shape == (16, 1, 16, 16) and y.dtype == torch.int64
    again, _ = next(iter(given.train.batches(16, shuffle=True, seed=3)))
    assert torch.equal(x, again)  # netshrink's seeded order, not the loader's


def test_the_cache_key_changes_when_the_factory_returns_other_data(
        user_module: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = parse_recipe(recipe(data={**DATA, "kwargs": {"noisy": True}}))

    def keys() -> list[str]:
        data = build_data(parsed.data)
        return stage_keys(parsed, parsed.parsed_stages(), data.fingerprint)

    first = keys()
    assert keys() == first  # random transforms are seeded while sampled
    monkeypatch.setattr(user_module, "SHIFT", 0.5)  # same factory and kwargs
    assert keys()[0] != first[0] and keys()[1] != first[1]
    monkeypatch.setattr(user_module, "SHIFT", 0.0)
    assert keys() == first
    # a dataset's keys stay as they always were: no fingerprint, no factory keys
    plain = parse_recipe(recipe(data={"name": "fashion_mnist"}))
    assert "factory" not in plain.data.model_dump(mode="json")
    assert stage_keys(plain, plain.parsed_stages()) == stage_keys(
        plain, plain.parsed_stages(), None)


def test_a_cached_stage_is_never_reused_for_other_data(
        user_module: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quick = recipe(stages=[{**TRAIN, "epochs": 1}])
    lines: list[str] = []
    run_recipe(parse_recipe(quick), tmp_path / "a", report=False, log=lines.append)
    run_recipe(parse_recipe(quick), tmp_path / "b", report=False, log=lines.append)
    assert any("model taken from the cache" in line for line in lines)
    lines.clear()
    monkeypatch.setattr(user_module, "SHIFT", 0.5)
    run_recipe(parse_recipe(quick), tmp_path / "c", report=False, log=lines.append)
    assert not any("from the cache" in line for line in lines)


def test_a_study_of_two_cells_with_a_data_factory(user_module: Any, tmp_path: Path) -> None:
    study = parse_study({
        "name": "user-data-study", "matrix": {"ratio": [0.3, 0.6]},
        "recipe": recipe(stages=[dict(TRAIN, name="train"),
                                 {"kind": "prune.magnitude", "name": "prune",
                                  "from": "train", "ratio": "${ratio}"}])})
    outcome = run_study(study, tmp_path / "study", log=lambda _: None, report=False)
    assert sorted(outcome.ran) == ["0.3", "0.6"] and not outcome.failed
    for cell in outcome.ran:
        run = json.loads((tmp_path / "study" / "cells" / cell / "run.json").read_text())
        acc = run["stages"][-1]["measurement"]["accuracy"]
        assert acc["images"] == 30 and run["recipe"]["data"]["factory"] == FACTORY


@pytest.mark.slow
def test_a_study_with_a_data_factory_on_worker_processes(user_module: Any,
                                                         tmp_path: Path) -> None:
    study = parse_study({"name": "user-data-pool", "recipe": recipe(
        stages=[dict(TRAIN, epochs=1), {"kind": "prune.magnitude", "ratio": "${ratio}"}]),
        "matrix": {"ratio": [0.3, 0.6]}})
    outcome = run_study(study, tmp_path / "study", workers=2, log=lambda _: None,
                        report=False)
    assert len(outcome.ran) == 2 and not outcome.failed


QUICK = {"channel_ratios": [0.5], "drop_blocks": [], "sparsities": [],
         "kmeans_bits": [8], "kmeans_finetune_epochs": 0, "channel_scope": "layer",
         "max_steps": 2, "timing": False, "budget_points": 100.0, "calib_size": 8,
         "amp": "auto"}


def test_compress_takes_dataloaders(user_module: Any, trained: Path, tmp_path: Path) -> None:
    weights = trained / json.loads((trained / "run.json").read_text())["stages"][-1][
        "artifact"]
    train, test = user_module.loaders()
    val = DataLoader(user_module.images(24, 2), batch_size=8)
    result = netshrink.compress(weights, tmp_path / "c", train=train, val=val, test=test,
                                quiet=True, **QUICK)
    assert result.chosen is not None and result.deployable is not None
    assert result.deployable.is_file()
    chosen = result.test["chosen"]["accuracy"]
    assert chosen["split"] == "test" and chosen["images"] == 30  # reported on test=
    study = json.loads((tmp_path / "c" / "study.json").read_text())
    data = study["cells"][0]["recipe"]["data"]
    assert data["factory"] == IN_MEMORY_FACTORY and data["batch_size"] == 256
    finetune = next(s for s in study["cells"][1]["recipe"]["stages"] if s["kind"] == "finetune")
    assert finetune["batch_size"] == 16  # the training loader's
    decided = json.loads((tmp_path / "c" / "cells" / study["cells"][0]["name"] / "run.json")
                         .read_text())["stages"][0]["measurement"]["accuracy"]
    assert decided["split"] == "val" and decided["images"] == 24  # decided on val=
    assert not _IN_MEMORY  # held only for the call


def test_compress_refuses_val_that_is_test_and_half_given_loaders(user_module: Any,
                                                                  trained: Path,
                                                                  tmp_path: Path) -> None:
    train, test = user_module.loaders()
    with pytest.raises(UserError, match="val and test are the same data"):
        netshrink.compress(trained / "stages/01-train/model.safetensors", tmp_path / "c",
                           train=train, val=test, test=test, quiet=True, **QUICK)
    with pytest.raises(UserError, match="give test= too"):
        netshrink.compress(trained / "stages/01-train/model.safetensors", tmp_path / "c",
                           train=train, quiet=True, **QUICK)
    assert not (tmp_path / "c").exists()


def test_in_memory_data_is_refused_on_worker_processes(tmp_path: Path) -> None:
    study = parse_study({"name": "s", "recipe": recipe(
        data={"factory": IN_MEMORY_FACTORY, "kwargs": {"key": "0" * 64}}),
        "matrix": {"seed": {"a": {"set": {"seed": 1}}, "b": {"set": {"seed": 2}}}}})
    with pytest.raises(UserError, match="live in this process only") as err:
        run_study(study, tmp_path / "s", workers=2, log=lambda _: None)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="live in the calling process only"):
        build_data(study.cells[0].recipe.data)  # a worker that would have run it
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("factory", "expected"), [
    ("nsnothere:data", "cannot import it (No module named 'nsnothere'); install its "
                       "package or put its folder on PYTHONPATH"),
    (f"{MODULE}:missing", "cannot import it"),
    (f"{MODULE}:returns_list", "returned a list; return a dict {'train': ..."),
    (f"{MODULE}:flat_items", "train, item 0: the image is a torch.float32 tensor of shape "
                             "(16, 16), expected a float tensor [C, H, W]"),
    (f"{MODULE}:same_val_and_test", "val and test are the same data"),
    (f"{MODULE}:data", "failed with the arguments {'bogus': 1} (TypeError"),
])
def test_a_bad_factory_is_one_line_and_exit_2(user_module: Any, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              factory: str, expected: str) -> None:
    raw = recipe(data={"factory": factory,
                       **({"kwargs": {"bogus": 1}} if factory == FACTORY else {})})
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(raw))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("netshrink: error: ") and "\n" not in err
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_a_study_checks_its_data_factory_before_the_first_cell(
        user_module: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "study.yaml"
    spec.write_text(json.dumps({"name": "s", "recipe": recipe(data={"factory": "nsnothere:fn"}),
                                "matrix": {"seed": {"a": {"set": {"seed": 1}}}}}))
    assert main(["study", str(spec), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "data.factory nsnothere:fn: cannot import it" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_commands_take_a_factory_by_name_and_files_never_name_one(
        user_module: Any, trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = str(trained / "stages/01-train/model.safetensors")
    # the file records its factory, but a file never has one imported
    assert main(["eval", "--weights", weights]) == 2
    err = capsys.readouterr().err
    assert f"pass --data {FACTORY}" in err and err.count("\n") == 1
    assert main(["eval", "--weights", weights, "--data", FACTORY,
                 "--data-kwargs", '{"n_test": 30}']) == 0
    result = json.loads(capsys.readouterr().out)
    model, _, _ = load_model(Path(weights))
    assert result["top1"] == pytest.approx(top1(model, user_module.data()["test"]))
    assert result["dataset"] == FACTORY
    assert main(["compress", "--weights", weights, "--out", "unused"]) == 2
    assert f"pass --data {FACTORY}" in capsys.readouterr().err
    # --data-dir is a dataset's folder; a factory reads its own files
    assert main(["eval", "--weights", weights, "--data", FACTORY, "--data-dir", "x"]) == 2
    assert "--data-kwargs" in capsys.readouterr().err
