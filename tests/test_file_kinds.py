"""Every file netshrink writes is an input: ``eval``, ``predict`` and ``bench`` take each kind
a run leaves (safetensors, float and INT8 ONNX, .nspk, OpenVINO IR), told by content, and
``eval`` gives the top-1 the run recorded for that file; ``export`` writes files that are
inputs too; the commands explain themselves (``--help``: defaults and examples)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from netshrink.cli import build_parser, main
from netshrink.data.idx import FASHION_CLASSES
from netshrink.errors import UserError
from netshrink.store.kinds import file_kind

RECIPE = """
name: kinds
model: {{arch: resnet_tiny}}
data: {{name: fashion_mnist, root: {root}, val_size: 50, calib_size: 32}}
measure: {{latency: false}}
stages:
  - {{kind: train, epochs: 2, batch_size: 32, lr: 0.05}}
  - {{kind: export.onnx}}
  - {{kind: quant.ptq}}
  - {{kind: quant.ptq, name: ov, runtime: openvino}}
  - {{kind: quant.kmeans, bits: 4}}
  - {{kind: quant.fp16}}
"""

# (stage whose recorded figures the file must reproduce, file in that stage's folder)
FILES = [
    ("train", "model.safetensors"),
    ("export.onnx", "model.onnx"),
    ("quant.ptq", "model.onnx"),
    ("quant.ptq", "model.nspk"),  # the INT8 ONNX packed: the same model, byte for byte
    ("ov", "openvino/model.xml"),
    ("quant.kmeans", "model.nspk"),
    ("quant.fp16", "model.fp16.safetensors"),
]
KINDS = {"model.safetensors": "safetensors", "model.onnx": "onnx", "model.nspk": "nspk",
         "openvino/model.xml": "openvino", "model.fp16.safetensors": "safetensors"}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run(fashion_dir, tmp_path_factory) -> dict:
    """A tiny run that writes every kind of model file; its folder, record and stages."""
    folder = tmp_path_factory.mktemp("kinds")
    recipe = folder / "kinds.yaml"
    recipe.write_text(RECIPE.format(root=fashion_dir))
    out = folder / "run"
    assert main(["run", str(recipe), "--out", str(out), "--no-report", "--no-cache"]) == 0
    record = json.loads((out / "run.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    folders = {s["name"]: out / Path(s["artifact"]).parts[0] / Path(s["artifact"]).parts[1]
               for s in record["stages"]}
    return {"out": out, "stages": stages, "folders": folders, "data": fashion_dir}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "square.png"
    pixels = torch.full((28, 28), 30, dtype=torch.uint8)
    pixels[5:23, 5:23] = 250  # the learnable set's class 9 ("Ankle boot")
    Image.fromarray(pixels.numpy()).save(path)
    return path


def eval_json(capsys, weights: Path, *extra: str) -> dict:
    code, out, err = run_cli(capsys, "eval", "--weights", str(weights), *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize(("stage", "name"), FILES, ids=[f"{s}/{n}" for s, n in FILES])
def test_eval_predict_bench_take_every_file_a_run_writes(capsys, run, image, stage,
                                                         name) -> None:
    path = run["folders"][stage] / name
    recorded = run["stages"][stage]["measurement"]
    assert file_kind(path) == KINDS[name]

    # eval: the same images in the same runtime give the top-1 the run recorded
    got = eval_json(capsys, path, "--data-dir", str(run["data"]))
    assert got["kind"] == KINDS[name] and got["runtime"] == recorded["runtime"]
    assert got["images"] == recorded["accuracy"]["images"]
    assert got["top1"] == recorded["accuracy"]["top1"], (got, recorded["accuracy"])
    assert got["dataset"] == "fashion_mnist"  # from the file itself: no --data

    # predict: class names come from the file
    code, out, err = run_cli(capsys, "predict", "--weights", str(path), "--top", "3",
                             str(image))
    lines = out.strip().splitlines()
    assert code == 0 and lines[0] == f"{image}:" and len(lines) == 4, err
    assert all(line.split("%  ", 1)[1] in FASHION_CLASSES for line in lines[1:]), lines

    # bench: the counts the run recorded (an ONNX or IR file carries them)
    code, out, err = run_cli(capsys, "bench", "--weights", str(path), "--repeats", "1",
                             "--batch-size", "2", "--threads", "1", "--min-seconds", "0")
    assert code == 0, err
    assert f"params {recorded['params']:,} (non-zero {recorded['nonzero_params']:,})" in out
    assert f"MACs {recorded['macs'] / 1e6:,.1f} M" in out
    assert f"run in {recorded['runtime']}" in out


def test_int8_onnx_keeps_the_validation_split(capsys, run) -> None:
    got = eval_json(capsys, run["folders"]["quant.ptq"] / "model.onnx", "--split", "val",
                    "--data-dir", str(run["data"]))
    assert got["split"] == "val" and got["images"] == 50 and got["precision"] == "int8"


def test_a_model_file_records_how_its_run_cut_and_fed_the_training_images(run) -> None:
    from netshrink.store.checkpoint import load_model

    meta = load_model(run["folders"]["train"] / "model.safetensors")[2]
    # compress decides on these images and fine-tunes with the same augmentation
    assert meta["split"] == {"val_size": 50, "seed": 0, "train_limit": None, "augment": True,
                             "test_limit": None}


def test_a_renamed_file_is_told_by_its_content(capsys, run, tmp_path) -> None:
    onnx_named_st = tmp_path / "model.safetensors"
    shutil.copy(run["folders"]["quant.ptq"] / "model.onnx", onnx_named_st)
    st_named_onnx = tmp_path / "weights.onnx"
    shutil.copy(run["folders"]["train"] / "model.safetensors", st_named_onnx)
    assert file_kind(onnx_named_st) == "onnx" and file_kind(st_named_onnx) == "safetensors"
    for path, stage in ((onnx_named_st, "quant.ptq"), (st_named_onnx, "train")):
        got = eval_json(capsys, path, "--data-dir", str(run["data"]))
        assert got["top1"] == run["stages"][stage]["measurement"]["accuracy"]["top1"]
    # commands that change a model say what the file is and what they need
    code, _, err = run_cli(capsys, "prune", "--weights", str(onnx_named_st), "--method",
                           "magnitude", "--out", str(tmp_path / "p"))
    assert code == 2 and "an ONNX model, not torch weights" in err and "refusing" not in err


@pytest.mark.parametrize("content", [b"hello, not a model\n", b"\x08\x07garbage" * 10,
                                     b'{"json": true}'], ids=["text", "protobuf-ish", "json"])
def test_unknown_kind_is_one_line_naming_the_kinds(capsys, tmp_path, content) -> None:
    path = tmp_path / "mystery.bin"
    path.write_bytes(content)
    for command in (["eval", "--weights", str(path), "--data", "fashion_mnist"],
                    ["bench", "--weights", str(path)],
                    ["predict", "--weights", str(path), str(path)]):
        code, _, err = run_cli(capsys, *command)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        for kind in ("safetensors", "torch", "ONNX", "OpenVINO IR", ".nspk"):
            assert kind in lines[0], lines[0]
    with pytest.raises(UserError, match="not a model file netshrink reads"):
        file_kind(path)


def test_onnx_from_elsewhere_opens_and_says_which_flag_is_missing(capsys, run, image,
                                                                  tmp_path) -> None:
    import onnx

    model = onnx.load(str(run["folders"]["export.onnx"] / "model.onnx"))
    del model.metadata_props[:]  # what torch.onnx alone writes: no netshrink metadata
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))

    code, _, err = run_cli(capsys, "eval", "--weights", str(foreign))
    assert code == 2 and "does not say its dataset" in err and "--data" in err
    got = eval_json(capsys, foreign, "--data", "fashion_mnist", "--data-dir",
                    str(run["data"]))
    assert got["top1"] == run["stages"]["export.onnx"]["measurement"]["accuracy"]["top1"]

    code, _, err = run_cli(capsys, "predict", "--weights", str(foreign), str(image))
    assert code == 2 and "class names" in err and "--data" in err
    code, out, err = run_cli(capsys, "predict", "--weights", str(foreign), "--data",
                             "fashion_mnist", "--data-dir", str(run["data"]), str(image))
    assert code == 0 and out.splitlines()[1].split("%  ", 1)[1] in FASHION_CLASSES, err

    code, out, err = run_cli(capsys, "bench", "--weights", str(foreign), "--repeats", "1",
                             "--batch-size", "2", "--threads", "1", "--min-seconds", "0")
    assert code == 0 and "params " in out and "no netshrink metadata" in err, err


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "tensorrt-onnx"])
def test_export_writes_files_that_eval_to_the_torch_top1(capsys, run, tmp_path, fmt) -> None:
    weights = run["folders"]["train"] / "model.safetensors"
    out = {"onnx": tmp_path / "m.onnx", "openvino": tmp_path / "ir" / "m.xml",
           "tensorrt-onnx": tmp_path / "trt"}[fmt]
    out.parent.mkdir(exist_ok=True)
    extra = ["--forms", "fp32", "fp16"] if fmt == "tensorrt-onnx" else []
    code, stdout, err = run_cli(capsys, "export", "--weights", str(weights), "--format", fmt,
                                "--out", str(out), *extra)
    assert code == 0, err
    assert "max |" in stdout
    written = {"onnx": [out], "openvino": [out],
               "tensorrt-onnx": [out / "model.fp32.onnx", out / "model.fp16.onnx"]}[fmt]
    if fmt == "openvino":
        assert out.with_suffix(".bin").is_file() and file_kind(out) == "openvino"
    if fmt == "tensorrt-onnx":
        assert (out / "trtexec.sh").is_file()
    torch_top1 = run["stages"]["train"]["measurement"]["accuracy"]["top1"]
    images = run["stages"]["train"]["measurement"]["accuracy"]["images"]
    for path in written:
        got = eval_json(capsys, path, "--data-dir", str(run["data"]))
        # float exports: the same predictions, but for an image whose top two logits
        # are within float rounding of each other
        assert abs(got["top1"] - torch_top1) <= 1 / images, (path, got["top1"], torch_top1)
        assert got["dataset"] == "fashion_mnist"


def test_export_refuses_what_it_cannot_do(capsys, run, tmp_path) -> None:
    onnx_file = run["folders"]["export.onnx"] / "model.onnx"
    code, _, err = run_cli(capsys, "export", "--weights", str(onnx_file), "--format", "onnx",
                           "--out", str(tmp_path / "again.onnx"))
    assert code == 2 and "export takes torch weights" in err
    code, _, err = run_cli(capsys, "export", "--weights", str(onnx_file), "--format",
                           "openvino", "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "name the .xml" in err
    assert not list(tmp_path.iterdir())


def test_no_timing_measures_without_latency(capsys, run, tmp_path) -> None:
    weights = run["folders"]["train"] / "model.safetensors"
    code, _, err = run_cli(capsys, "quantize", "--weights", str(weights), "--method", "fp16",
                           "--no-timing", "--data-dir", str(run["data"]), "--out",
                           str(tmp_path / "q"))
    assert code == 0, err
    record = json.loads((tmp_path / "q" / "run.json").read_text())
    last = record["stages"][-1]["measurement"]
    assert last["latency"] is None and last["accuracy"]["top1"] > 0


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_help_shows_defaults_and_ends_with_an_example(command) -> None:
    text = _subcommands()[command].format_help()
    assert "default" in text
    tail = text.strip().split("\n\n")[-1]
    assert tail.startswith("example") and f"netshrink {command}" in tail, tail


def test_ratio_help_says_what_each_method_removes() -> None:
    text = " ".join(_subcommands()["prune"].format_help().split())
    assert "1-(1-r)^2 of the conv parameters" in text and "magnitude: the fraction" in text
