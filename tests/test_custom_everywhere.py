"""The user's own model, saved once with its factory, through every command, recipes and
compress: its factory runs only when trusted (``--trust``, ``trust=``, a recipe's
``model.factory`` or ``trust:``), and every file made from it is again an input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import netshrink
from custom_models import make_tiny
from netshrink.cli import main
from netshrink.errors import UserError
from netshrink.models.factory import trusting
from netshrink.store.checkpoint import LEGACY_CUSTOM_FORMAT, load_model

FACTORY = "custom_models:make_tiny"
META = {"dataset": "fashion_mnist", "class_names": [f"c{i}" for i in range(10)],
        "image_size": 28, "in_channels": 1, "mean": [0.286], "std": [0.353]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's flow in small: the user's module, saved with its factory and facts."""
    torch.manual_seed(0)
    result = netshrink.prune(make_tiny(8), netshrink.MagnitudePruneConfig(ratio=0.2))
    result.meta.update(META)
    return result.save(tmp_path_factory.mktemp("saved") / "tiny.safetensors", factory=FACTORY,
                       factory_kwargs={"width": 8})


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_refuses_an_untrusted_factory_in_one_line(saved, fashion_dir,
                                                                 tmp_path, capsys) -> None:
    for argv in (["eval", "--weights", str(saved), "--data-dir", str(fashion_dir)],
                 ["bench", "--weights", str(saved), "--repeats", "1"],
                 ["export", "--weights", str(saved), "--format", "onnx", "--out",
                  str(tmp_path / "m.onnx")],
                 ["prune", "--weights", str(saved), "--method", "channel", "--data-dir",
                  str(fashion_dir), "--out", str(tmp_path / "p")]):
        code, _, err = run(argv, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"--trust {FACTORY}" in err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "p").exists()


def test_commands_take_the_trusted_file(saved, fashion_dir, tmp_path, capsys) -> None:
    trust = ["--trust", FACTORY]
    code, out, _ = run(["eval", "--weights", str(saved), "--data-dir", str(fashion_dir),
                        *trust], capsys)
    assert code == 0 and "top1" in out
    image = tmp_path / "x.png"
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(image)
    code, out, _ = run(["predict", "--weights", str(saved), str(image), *trust], capsys)
    assert code == 0 and "c" in out.split("\n")[1]
    onnx_file = tmp_path / "m.onnx"
    code, out, _ = run(["export", "--weights", str(saved), "--format", "onnx", "--out",
                        str(onnx_file), *trust], capsys)
    assert code == 0 and onnx_file.is_file()
    x = torch.randn(2, 1, 28, 28)
    with trusting(FACTORY):
        model = load_model(saved)[0]
    assert torch.allclose(netshrink.load(onnx_file)(x), model(x), atol=1e-4)


def test_prune_and_quantize_commands_write_files_that_load_again(saved, fashion_dir,
                                                                 tmp_path, capsys) -> None:
    trust = ["--trust", FACTORY, "--no-timing", "--data-dir", str(fashion_dir)]
    out_dir = tmp_path / "p"
    code, _, err = run(["prune", "--weights", str(saved), "--method", "channel", "--ratio",
                          "0.5", "--out", str(out_dir), *trust], capsys)
    assert code == 0, err
    pruned = next(out_dir.glob("stages/*/model.safetensors"))
    again = netshrink.load(pruned, trust=[FACTORY])
    assert again.factory == FACTORY and again.model.conv1.out_channels < 8
    code, _, err = run(["quantize", "--weights", str(pruned), "--method", "ptq", "--out",
                          str(tmp_path / "q"), *trust], capsys)
    assert code == 0, err
    assert netshrink.load(next((tmp_path / "q").glob("stages/*/model.onnx"))).precision == "int8"


def test_a_recipe_starts_from_the_users_factory(fashion_dir, tmp_path, capsys) -> None:
    """``model: {factory, kwargs}`` trains the user's model from a seed; the run's files
    name the factory, and the recipe's naming of it is the trust."""
    recipe = {"name": "mine", "model": {"factory": FACTORY, "kwargs": {"width": 6}},
              "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 50},
              "measure": {"latency": False},
              "stages": [{"kind": "train", "epochs": 1, "max_steps": 2, "batch_size": 32},
                         {"kind": "prune.channel", "ratio": 0.5}]}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    code, _, err = run(["run", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    files = [tmp_path / "out" / s["artifact"] for s in record["stages"] if s.get("artifact")]
    with trusting(FACTORY):
        models = [load_model(f)[0] for f in files]
    assert models[0].conv1.out_channels == 6 and models[-1].conv1.out_channels == 3
    # the same file from another recipe: its factory must be trusted there too
    again = {**recipe, "model": {"weights": str(files[-1])}, "stages": []}
    path.write_text(json.dumps(again))
    code, _, err = run(["run", str(path), "--out", str(tmp_path / "again")], capsys)
    assert code == 2 and "trust" in err
    path.write_text(json.dumps({**again, "trust": [FACTORY]}))
    code, _, err = run(["run", str(path), "--out", str(tmp_path / "again")], capsys)
    assert code == 0, err


def test_a_recipe_refuses_a_factory_with_netshrink_model_keys(tmp_path, capsys) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"model": {"factory": FACTORY, "arch": "resnet50"}}))
    code, _, err = run(["run", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "with a factory, give its arguments in kwargs" in err
    path.write_text(json.dumps({"model": {"factory": "not a path"}}))
    code, _, err = run(["run", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "import path" in err
    assert not (tmp_path / "out").exists()


def test_compress_takes_the_users_module_with_its_factory(fashion_dir, tmp_path) -> None:
    torch.manual_seed(0)
    module = make_tiny(8)
    with pytest.raises(UserError, match="factory="):
        netshrink.compress(module, tmp_path / "c", data="fashion_mnist", data_dir=fashion_dir)
    result = netshrink.compress(
        module, tmp_path / "c", data="fashion_mnist", data_dir=fashion_dir, quiet=True,
        factory=FACTORY, factory_kwargs={"width": 8}, channel_ratios=[0.5], drop_blocks=[],
        sparsities=[], finetune_epochs=1, max_steps=2, val_size=100, timing=False)
    assert result.chosen is not None and result.deployable is not None
    chosen = netshrink.load(result.deployable, trust=[FACTORY])
    assert chosen(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_files_of_the_earlier_custom_format_still_load(tmp_path) -> None:
    """``netshrink.custom/1`` (factory in the header) reads as a spec with that factory."""
    from safetensors.torch import save as st_save

    model = make_tiny(8).eval()
    header = {"format": LEGACY_CUSTOM_FORMAT, "factory": FACTORY,
              "factory_kwargs": json.dumps({"width": 8}), "meta": json.dumps(META)}
    path = tmp_path / "old.safetensors"
    path.write_bytes(st_save({k: v.contiguous() for k, v in model.state_dict().items()},
                             metadata=header))
    with pytest.raises(UserError, match="trust"):
        netshrink.load(path)
    again = netshrink.load(path, trust=[FACTORY])
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(again(x), model(x)) and again.input_shape == [1, 28, 28]
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] > 0


def test_a_study_of_the_users_model_in_a_pool(fashion_dir, tmp_path) -> None:
    """Cells are recipes naming the factory: pool workers (fresh processes) trust it too."""
    from netshrink.study import parse_study, run_study

    study = {"name": "mine", "recipe": {
        "model": {"factory": FACTORY, "kwargs": {"width": 8}},
        "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 50,
                 "test_limit": 100},
        "measure": {"latency": False},
        "stages": [{"kind": "train", "name": "train", "epochs": 1, "max_steps": 2,
                    "batch_size": 32}]},
        "matrix": {"ratio": [0.25, 0.5]}}
    study["recipe"]["stages"].append({"kind": "prune.channel", "name": "prune",
                                      "from": "train", "ratio": "${ratio}"})
    outcome = run_study(parse_study(study), tmp_path / "s", workers=2, log=lambda _: None)
    assert len(outcome.ran) == 2 and not outcome.failed
    widths = set()
    for cell in (tmp_path / "s" / "cells").iterdir():
        record = json.loads((cell / "run.json").read_text())
        with trusting(FACTORY):
            widths.add(load_model(cell / record["stages"][-1]["artifact"])[0]
                       .conv1.out_channels)
    assert widths == {6, 4}
