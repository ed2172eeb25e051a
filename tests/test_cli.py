"""The command line: bad input gets one clear line and a non-zero exit, no traceback, and
nothing half-written; the happy paths print what a user needs."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_learnable_fashion
from netshrink.cli import main
from netshrink.models import ModelSpec, build_model


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("netshrink: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


TINY_RECIPE = """
name: tiny
model: {{arch: resnet_tiny}}
data: {{name: fashion_mnist, root: {root}, val_size: 50, calib_size: 16}}
measure: {{latency: false}}
stages:
  - {{kind: train, epochs: 1, batch_size: 64, lr: 0.05}}
"""


def test_missing_dataset_path(capsys, tmp_path) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--arch", "resnet_tiny", "--data-dir",
                           str(tmp_path / "nowhere"), "--out", str(out))
    assert_one_line_error(code, err, "nowhere", "dataset folder not found", "--data-dir")
    assert not out.exists()


def test_truncated_idx_file(capsys, tmp_path) -> None:
    root = write_learnable_fashion(tmp_path / "fm", n_train=50, n_test=20)
    images = root / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:-100]))
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--arch", "resnet_tiny", "--data-dir", str(root),
                           "--out", str(out))
    assert_one_line_error(code, err, "train-images-idx3-ubyte.gz", "truncated")
    assert not out.exists()


def test_negative_epochs(capsys, tmp_path, fashion_dir) -> None:
    code, _, err = run_cli(capsys, "train", "--arch", "resnet_tiny", "--epochs", "-2",
                           "--data-dir", str(fashion_dir), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "epochs", "greater than 0", "-2")
    assert not (tmp_path / "run").exists()


def test_recipe_with_unknown_key_or_stage(capsys, tmp_path, fashion_dir) -> None:
    bad_key = write_recipe(tmp_path / "k.yaml", TINY_RECIPE.format(root=fashion_dir)
                           .replace("epochs: 1", "epochz: 1"))
    code, _, err = run_cli(capsys, "run", str(bad_key), "--out", str(tmp_path / "a"))
    assert_one_line_error(code, err, "unknown key 'epochz'", "allowed: epochs")
    bad_stage = write_recipe(tmp_path / "s.yaml", TINY_RECIPE.format(root=fashion_dir)
                             .replace("kind: train", "kind: trian"))
    code, _, err = run_cli(capsys, "run", str(bad_stage), "--out", str(tmp_path / "b"))
    assert_one_line_error(code, err, "unknown stage kind 'trian'",
                          "known: compress, deploy.torch, distill.kd, export.onnx, "
                          "export.tensorrt, finetune, ", ", train")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_checkpoint_for_another_architecture(capsys, tmp_path, fashion_dir) -> None:
    other = tmp_path / "r18.pth"
    torch.save(build_model(ModelSpec(arch="resnet18", num_classes=10, in_channels=1))
               .state_dict(), other)
    body = TINY_RECIPE.format(root=fashion_dir).replace(
        "{arch: resnet_tiny}", f"{{arch: resnet_tiny, weights: {other}}}")
    recipe = write_recipe(tmp_path / "r.yaml", body)
    code, _, err = run_cli(capsys, "run", str(recipe), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "r18.pth", "does not fit resnet_tiny", "looks like resnet18")
    assert not (tmp_path / "run").exists()


def test_pickle_that_would_run_code(capsys, tmp_path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": Payload()}))
    code, _, err = run_cli(capsys, "eval", "--weights", str(evil), "--data", "fashion_mnist")
    assert_one_line_error(code, err, "evil.pth", "refusing to load")
    assert not marker.exists()


@pytest.mark.slow  # ~28 s: eval/predict/bench of every file kind run in tests/test_file_kinds.py
def test_train_eval_predict_bench_happy_path(capsys, tmp_path, fashion_dir) -> None:
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", "--arch", "resnet_tiny", "--epochs", "2",
                              "--lr", "0.05", "--batch-size", "32", "--data-dir",
                              str(fashion_dir), "--out", str(out))
    assert code == 0
    weights = out / "stages" / "01-train" / "model.safetensors"
    assert f"model: {weights}" in stdout and (out / "report.html").is_file()

    code, stdout, _ = run_cli(capsys, "eval", "--weights", str(weights), "--data-dir",
                              str(fashion_dir))
    assert code == 0 and '"top1"' in stdout and '"dataset": "fashion_mnist"' in stdout

    from PIL import Image

    image = tmp_path / "square.png"
    pixels = torch.full((28, 28), 30, dtype=torch.uint8)  # the training images' mean noise
    pixels[5:23, 5:23] = 250  # the learnable set's class 9 ("Ankle boot"): 18 px, brightest
    Image.fromarray(pixels.numpy()).save(image)
    code, stdout, _ = run_cli(capsys, "predict", "--weights", str(weights), str(image))
    lines = stdout.strip().splitlines()
    assert code == 0 and lines[0] == f"{image}:" and len(lines) == 6
    assert lines[1].endswith("Ankle boot"), lines

    code, stdout, _ = run_cli(capsys, "bench", "--weights", str(weights), "--repeats", "2",
                              "--batch-size", "4", "--min-seconds", "0")
    assert code == 0 and "run-to-run spread" in stdout and "p50" in stdout


def test_subprocess_exit_code_and_no_traceback(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "netshrink.cli", "run", str(tmp_path / "missing.yaml"),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    missing = tmp_path / "missing.yaml"
    assert result.stderr.strip() == (
        f"netshrink: error: {missing}: recipe not found; give the recipe's .yaml file")


@pytest.mark.parametrize("argv", [["bench", "--input", "3x224"], ["bench", "--threads", "0"]])
def test_argument_errors_exit_nonzero(capsys, argv) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


@pytest.fixture(scope="module")
def trained_tiny(fashion_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", "--arch", "resnet_tiny", "--epochs", "1", "--batch-size", "64",
                 "--data-dir", str(fashion_dir), "--out", str(out), "--no-timing"]) == 0
    return out / "stages" / "01-train" / "model.safetensors"


@pytest.mark.parametrize("method,extra", [
    # ~20 s each; the same command path as channel, which stays in the default run
    pytest.param("magnitude", ["--scope", "global"], marks=pytest.mark.slow),
    pytest.param("nm", [], marks=pytest.mark.slow),
    ("channel", ["--importance", "l2"])])
def test_prune_command_measures_before_and_after(capsys, tmp_path, fashion_dir, trained_tiny,
                                                 method, extra) -> None:
    capsys.readouterr()
    # nm has no ratio (a flag its method does not take is refused)
    ratio = [] if method == "nm" else ["--ratio", "0.5"]
    code, stdout, _ = run_cli(capsys, "prune", "--weights", str(trained_tiny), "--method", method,
                              *ratio, *extra, "--data-dir", str(fashion_dir),
                              "--out", str(tmp_path / method), "--no-timing")
    assert code == 0
    before = next(line for line in stdout.splitlines() if line.startswith("before:"))
    after = next(line for line in stdout.splitlines() if line.startswith("after:"))

    params_before, params_after = (int(x.split()[1].replace(",", "")) for x in (before, after))
    if method == "channel":
        assert params_before / params_after > 2.5
    else:  # masks: the same parameters, half of the pruned layers' weights now zero
        assert params_before == params_after
        nonzero_after = int(after.split(", ")[1].split()[0].replace(",", ""))
        assert nonzero_after < 0.6 * params_after
    assert (tmp_path / method / "report.html").is_file()


def test_prune_ratio_out_of_range(capsys, tmp_path, trained_tiny, fashion_dir) -> None:
    code, _, err = run_cli(capsys, "prune", "--weights", str(trained_tiny), "--method",
                           "magnitude", "--ratio", "1.5", "--data-dir", str(fashion_dir),
                           "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "ratio", "less than 1")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # 15 s; the INT8 stage and its files are in the default run (test_quant,
# test_file_kinds), the command's argument handling in test_hostile_runs
def test_quantize_command_writes_int8_and_measures_it(capsys, tmp_path, fashion_dir,
                                                      trained_tiny) -> None:
    capsys.readouterr()
    code, stdout, _ = run_cli(capsys, "quantize", "--weights", str(trained_tiny), "--method",
                              "ptq", "--keep-float", "fc", "--data-dir", str(fashion_dir),
                              "--out", str(tmp_path / "q"))
    assert code == 0
    before = next(line for line in stdout.splitlines() if line.startswith("before:"))
    after = next(line for line in stdout.splitlines() if line.startswith("after:"))
    assert "torch fp32" in before and "onnxruntime int8" in after
    top1 = [float(line.rsplit("top-1 ", 1)[1].rstrip("%")) for line in (before, after)]
    assert top1[1] >= top1[0] - 2.0  # INT8 keeps the float model's accuracy
    assert (tmp_path / "q" / "stages" / "01-quant.ptq" / "model.onnx").is_file()
    assert (tmp_path / "q" / "stages" / "01-quant.ptq" / "model.nspk").is_file()


@pytest.mark.slow  # 11 s; distillation is in the default run (test_distill), the CLI's
# argument handling in test_hostile_runs
def test_distill_command_trains_a_student(capsys, tmp_path, fashion_dir, trained_tiny) -> None:
    code, _, _ = run_cli(capsys, "distill", "--teacher", str(trained_tiny), "--arch",
                         "resnet_tiny", "--epochs", "3", "--lr", "0.05", "--batch-size", "32",
                         "--data-dir", str(fashion_dir), "--out", str(tmp_path / "kd"))
    assert code == 0
    record = json.loads((tmp_path / "kd" / "run.json").read_text())
    assert record["stages"][1]["kind"] == "distill.kd"
    assert record["stages"][1]["measurement"]["accuracy"]["top1"] >= 0.5  # learned from scratch
