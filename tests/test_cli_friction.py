"""Issue 26, CLI friction: a named output's folder is made (through the walls, and taken
away again when the write fails), every list option reads ``a,b`` and ``a b`` alike
through one helper, every option of the prune methods' configs is a ``prune`` flag, and
``eval`` measures the images its run measured (or says what differs)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

import netshrink
from netshrink.cli import build_parser, main
from netshrink.cli.args import ListAction, number, whole_number
from netshrink.cli.prune import DEFAULT_RATIO, FLAG_OF, METHODS, prune_stage
from netshrink.data import DataConfig, build_data
from netshrink.errors import UserError
from netshrink.recipe import parse_recipe
from netshrink.store.outputs import output_folder
from netshrink.store.walls import owned_folder


@pytest.fixture(scope="module")
def model(trained_run: Path) -> Path:
    """The trained run's model file (a run with data.test_limit 100 of the 200 test
    images; see ``test_hostile_runs.TINY``)."""
    return trained_run / "stages" / "01-train" / "model.safetensors"


def one_line_error(capsys: pytest.CaptureFixture, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("netshrink: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------- 1. output folders


@pytest.mark.parametrize("fmt,out,written", [
    ("openvino", "ir/model.xml", ["ir/model.xml", "ir/model.bin"]),
    ("onnx", "a/b/model.onnx", ["a/b/model.onnx"]),
    ("tensorrt-onnx", "trt/fp32", ["trt/fp32/model.fp32.onnx", "trt/fp32/trtexec.sh"]),
])
def test_export_makes_the_folder_it_is_told_to_write_in(fmt, out, written, model, tmp_path,
                                                        monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # --out relative, as typed
    forms = ["--forms", "fp32"] if fmt == "tensorrt-onnx" else []
    assert main(["export", "--weights", str(model), "--format", fmt, "--out", out,
                 *forms]) == 0
    for name in written:
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert f"wrote {written[0]}" in capsys.readouterr().out


def test_a_failed_export_takes_away_the_folders_it_made_and_nothing_else(
        model, tmp_path, capsys) -> None:
    onnx = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(model), "--format", "onnx", "--out",
                 str(onnx)]) == 0
    capsys.readouterr()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("the user's")
    # export --format onnx takes torch weights: refused after the folders were made
    code = main(["export", "--weights", str(onnx), "--format", "onnx", "--out",
                 str(kept / "new" / "deeper" / "x.onnx")])
    one_line_error(capsys, code, "export takes torch weights")
    assert sorted(p.name for p in kept.iterdir()) == ["mine.txt"]
    assert (kept / "mine.txt").read_text() == "the user's"
    # a file where a folder would have to be: refused before anything is read or made
    code = main(["export", "--weights", str(model), "--format", "openvino", "--out",
                 str(kept / "mine.txt" / "ir" / "model.xml")])
    one_line_error(capsys, code, "mine.txt is not a folder")
    assert (kept / "mine.txt").read_text() == "the user's"


def test_output_folders_are_made_through_the_walls(tmp_path) -> None:
    """Inside a folder netshrink owns, a planted link on the way is refused (the walls'
    ``make_dirs``), and nothing is made where it points."""
    root, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "report_files").symlink_to(elsewhere)
    with owned_folder(root, "run"), pytest.raises(UserError, match="symbolic link"), \
            output_folder(root / "report_files" / "sub"):
        pass
    assert list(elsewhere.iterdir()) == []


def test_a_failed_write_removes_only_the_empty_folders_it_made(tmp_path) -> None:
    before = tmp_path / "before"
    before.mkdir()
    with pytest.raises(RuntimeError), output_folder(before / "a" / "b" / "c"):
        (before / "a" / "b" / "theirs.txt").write_text("not ours to delete")
        raise RuntimeError("the write failed")
    assert not (before / "a" / "b" / "c").exists()  # made and empty: removed
    assert (before / "a" / "b" / "theirs.txt").read_text() == "not ours to delete"
    with pytest.raises(RuntimeError), output_folder(before / "p" / "q"):
        raise RuntimeError("the write failed")
    assert sorted(p.name for p in before.iterdir()) == ["a"]  # p/q gone, before kept
    with output_folder(tmp_path / "x" / "y") as folder:
        (folder / "z.json").write_text("{}")
    assert (tmp_path / "x" / "y" / "z.json").is_file()  # a write that succeeds keeps it


def test_bench_json_and_python_save_make_their_folders(model, tmp_path, capsys) -> None:
    json_file = tmp_path / "measured" / "today" / "bench.json"
    assert main(["bench", "--weights", str(model), "--repeats", "1", "--min-seconds", "0",
                 "--batch-size", "2", "--json", str(json_file)]) == 0
    assert json.loads(json_file.read_text())[0]["params"] > 0
    saved = netshrink.load(model).save(tmp_path / "saved" / "copy.safetensors")
    assert saved.is_file() and netshrink.load(saved).model is not None


# ---------------------------------------------------------------- 2. list options

# Each command's required arguments, with OPT where the list option goes: before the
# positional arguments, which a list must not swallow.
OPT = "<option>"
BASES = {
    "run": ["run", OPT, "r.yaml", "--out", "o"],
    "train": ["train", "--out", "o", OPT],
    "distill": ["distill", "--teacher", "t", "--out", "o", OPT],
    "prune": ["prune", "--weights", "w", "--method", "channel", "--out", "o", OPT],
    "quantize": ["quantize", "--weights", "w", "--method", "ptq", "--out", "o", OPT],
    "eval": ["eval", "--weights", "w", OPT],
    "predict": ["predict", "--weights", "w", OPT, "i.png"],
    "bench": ["bench", "--weights", "w", OPT],
    "export": ["export", "--weights", "w", "--format", "onnx", "--out", "o", OPT],
    "compress": ["compress", "--weights", "w", "--out", "o", OPT],
    "study": ["study", OPT, "run", "s.yaml", "--out", "o"],
}


def list_options() -> list[tuple[str, argparse.Action]]:
    """Every option of every command that takes several values, however declared."""
    parser = build_parser()
    commands = next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    found = []
    for name, command in commands.items():
        for action in command._actions:
            several = action.nargs in ("+", "*") or isinstance(
                action, (argparse._AppendAction, argparse._ExtendAction, ListAction))
            if action.option_strings and several:
                found.append((name, action))
    return found


def test_every_list_option_goes_through_the_one_helper() -> None:
    found = list_options()
    names = {(command, action.option_strings[0]) for command, action in found}
    assert {("compress", "--channel-ratios"), ("compress", "--drop-blocks"),
            ("compress", "--sparsities"), ("compress", "--kmeans-bits"),
            ("compress", "--rungs"), ("prune", "--include"), ("prune", "--exclude"),
            ("prune", "--blocks"), ("quantize", "--include"), ("quantize", "--exclude"),
            ("export", "--forms"), ("eval", "--trust")} <= names
    strays = [f"{c} {a.option_strings[0]}" for c, a in found if not isinstance(a, ListAction)]
    assert strays == []
    for command, action in found:  # and each one's help says the syntax
        assert "comma" in (action.help or ""), (command, action.option_strings)


def _values(action: ListAction) -> list[str]:
    if action.allowed is not None:
        return list(action.allowed)[:3]
    if action.item is number:
        return ["0.2", "0.4", "0.6"]
    if action.item is whole_number:
        return ["1", "2", "3"]
    return ["pkg.a:f", "layer4.*", "fc"]


@pytest.mark.parametrize("command,flag", [(c, a.option_strings[0]) for c, a in list_options()])
def test_a_list_option_reads_commas_spaces_mixed_and_repeats(command, flag) -> None:
    parser = build_parser()
    action = next(a for c, a in list_options() if (c, a.option_strings[0]) == (command, flag))
    assert isinstance(action, ListAction)
    v = _values(action)
    forms = [[flag, ",".join(v)], [flag, f"{v[0]},{v[1]}", flag, v[2]],
             [flag, v[0], flag, f"{v[1]}, {v[2]}"]]
    if action.nargs == "+":  # not before a positional argument: spaces too
        forms += [[flag, *v], [flag, f"{v[0]},{v[1]}", v[2]]]
    want = [action.item(x) for x in v]
    for form in forms:
        base = BASES[command]
        argv = [*base[:base.index(OPT)], *form, *base[base.index(OPT) + 1:]]
        args = parser.parse_args(argv)
        assert getattr(args, action.dest) == want, argv
        if command == "predict":
            assert args.images == [Path("i.png")]  # the list did not swallow it


@pytest.mark.parametrize("argv,needles", [
    (["compress", "--weights", "w", "--out", "o", "--channel-ratios", "0.2,x"],
     ["--channel-ratios", "'x' in '0.2,x'", "not a number"]),
    (["compress", "--weights", "w", "--out", "o", "--kmeans-bits", "4", "4.5"],
     ["--kmeans-bits", "'4.5' in '4 4.5'", "not a whole number"]),
    (["export", "--weights", "w", "--format", "onnx", "--out", "o", "--forms", "fp32,fp8"],
     ["--forms", "'fp8' in 'fp32,fp8'", "not one of fp32, fp16, int8"]),
    (["prune", "--weights", "w", "--method", "channel", "--out", "o", "--include", ","],
     ["--include", "give at least one value"]),
])
def test_a_bad_list_item_is_named_with_its_option_and_value(argv, needles, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2
    for needle in needles:
        assert needle in err, (needle, err)


def test_empty_words_and_defaults_of_list_options() -> None:
    parse = build_parser().parse_args
    base = ["compress", "--weights", "w", "--out", "o"]
    assert parse([*base, "--drop-blocks", "0"]).drop_blocks == []
    assert parse([*base, "--drop-blocks", "none"]).drop_blocks == []
    export = ["export", "--weights", "w", "--format", "tensorrt-onnx", "--out", "o"]
    assert parse(export).forms == ["fp32", "fp16", "int8"]
    assert parse([*export, "--forms", "fp16"]).forms == ["fp16"]  # replaces the default


# ---------------------------------------------------------------- 3. prune's options

# For each method, every field of its config set to something other than its default.
EVERY_OPTION = {
    "magnitude": ["--ratio", "0.3", "--scope", "global", "--steps", "2", "--schedule",
                  "linear", "--step-finetune-epochs", "2", "--step-finetune-lr", "0.02",
                  "--include", "layer*,fc", "--exclude", "conv1"],
    "channel": ["--ratio", "0.3", "--scope", "sensitivity", "--steps", "2",
                "--step-finetune-epochs", "1", "--step-finetune-lr", "0.02", "--importance",
                "l2", "--include", "layer*", "--exclude", "fc", "--round-to", "none",
                "--max-layer-ratio", "0.8", "--scan-ratio", "0.4", "--scan-images", "64",
                "--share-by", "macs"],
    "nm": ["--n", "1", "--m", "8", "--include", "layer1.*", "--exclude", "fc"],
    "blocks": ["--count", "2", "--blocks", "layer3.1,layer2.1", "--scan-images", "64"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_option_of_a_prune_method_is_a_flag(method) -> None:
    config = METHODS[method]
    argv = ["prune", "--weights", "w", "--method", method, "--out", "o"]
    stage = prune_stage(build_parser().parse_args([*argv, *EVERY_OPTION[method]]))
    made = parse_recipe({"name": "p", "stages": [stage]}).parsed_stages()[0].config
    default = config.model_validate({"ratio": DEFAULT_RATIO} if "ratio" in config.model_fields
                                    else {})
    for field in config.model_fields:  # each flag reached its field: none left at default
        assert getattr(made, field) != getattr(default, field), (method, field, FLAG_OF)
    # left out, a flag is not passed: the config's own default applies
    bare = prune_stage(build_parser().parse_args(argv))
    assert parse_recipe({"name": "p", "stages": [bare]}).parsed_stages()[0].config == default


def test_a_flag_the_method_does_not_take_is_refused(model, tmp_path, capsys) -> None:
    base = ["prune", "--weights", str(model), "--no-timing", "--out", str(tmp_path / "o")]
    code = main([*base, "--method", "nm", "--ratio", "0.5"])
    one_line_error(capsys, code, "--ratio is an option of --method magnitude and channel",
                   "not of nm")
    code = main([*base, "--method", "magnitude", "--scope", "sensitivity"])
    one_line_error(capsys, code, "prune.magnitude", "scope", "'layer' or 'global'")
    assert not (tmp_path / "o").exists()


def test_prune_scope_sensitivity_is_the_verbs_and_the_stages(model, fashion_dir, tmp_path,
                                                             capsys) -> None:
    out = tmp_path / "sens"
    assert main(["prune", "--weights", str(model), "--method", "channel", "--ratio", "0.4",
                 "--scope", "sensitivity", "--scan-images", "32", "--data-dir",
                 str(fashion_dir), "--no-timing", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    stage = record["stages"][1]
    assert stage["config"]["scope"] == "sensitivity" and stage["config"]["scan_images"] == 32
    assert "sensitivity" in stage["notes"][0]
    commanded = netshrink.load(out / stage["artifact"]).model.state_dict()
    # the Python verb on the validation split a recipe on that data holds out
    data = build_data(DataConfig(name="fashion_mnist", root=fashion_dir))
    verb = netshrink.prune(netshrink.load(model), netshrink.ChannelPruneConfig(
        ratio=0.4, scope="sensitivity", scan_images=32), val=data.val).model.state_dict()
    assert commanded.keys() == verb.keys()
    for key in verb:
        assert torch.equal(commanded[key], verb[key]), key
    uniform = netshrink.prune(netshrink.load(model), netshrink.ChannelPruneConfig(ratio=0.4),
                              example_input=torch.zeros(1, 1, 28, 28)).model.state_dict()
    assert any(uniform[k].shape != verb[k].shape for k in verb)  # the scan shared it out


# ---------------------------------------------------------------- 4. eval's images


def eval_json(capsys, *argv: str) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["eval", *argv]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def test_eval_measures_the_images_its_run_measured(model, trained_run, fashion_dir,
                                                   capsys) -> None:
    record = json.loads((trained_run / "run.json").read_text())
    measured = record["stages"][1]["measurement"]["accuracy"]
    assert (measured["split"], measured["images"]) == ("test", 100)  # data.test_limit 100
    got, err = eval_json(capsys, "--weights", str(model), "--data-dir", str(fashion_dir))
    assert (got["split"], got["images"], got["top1"]) == ("test", 100, measured["top1"])
    assert got["recorded"]["top1"] == measured["top1"]
    assert "first 100 of 200 test images" in err and "--limit all" in err


def test_eval_says_what_differs_when_told_otherwise(model, fashion_dir, tmp_path,
                                                    capsys) -> None:
    got, err = eval_json(capsys, "--weights", str(model), "--data-dir", str(fashion_dir),
                         "--limit", "all")
    assert got["images"] == 200
    note = " ".join(err.split())
    assert "its run measured it on the first 100 test images (top-1 " in note
    assert "this evaluates all 200 test images (--limit)" in note
    assert "not the recorded one" in note
    got, err = eval_json(capsys, "--weights", str(model), "--data-dir", str(fashion_dir),
                         "--split", "val")
    assert (got["split"], got["images"]) == ("val", 50)
    assert "(--split)" in err and "not the recorded one" in err
    # copied out of its run folder, the file still says its test cut
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(model, copy)
    got, err = eval_json(capsys, "--weights", str(copy), "--data-dir", str(fashion_dir))
    assert got["images"] == 100 and "metadata" in got["recorded"]["source"]
    assert "first 100 of 200 test images" in err
