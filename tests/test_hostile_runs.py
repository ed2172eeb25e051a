"""Hostile input to runs and commands, as a user's mistake or an attacker would give it.

One table: each case builds its hostile files in the test's own folder and names the
command. Every case must end the same way: exit 2, one line ``netshrink: error: …`` that
names the problem, no traceback, and no byte changed anywhere: not outside ``--out``
(the walls) and not inside it (bad input is refused before the first write).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from netshrink.cli import main
from netshrink.models import ModelSpec, build_model
from netshrink.store.checkpoint import save_model

TINY = {
    "name": "tiny",
    "model": {"arch": "resnet_tiny"},
    "data": {"name": "fashion_mnist", "val_size": 50, "calib_size": 16, "train_limit": 200,
             "test_limit": 100},
    "measure": {"latency": False},
    "stages": [{"kind": "train", "epochs": 1, "batch_size": 64, "lr": 0.05, "max_steps": 2}],
}


@dataclass
class Env:
    """The folder a case builds in: the dataset, a trained run, a victim's files."""

    tmp: Path
    fashion: Path
    trained_run: Path  # a finished netshrink run of TINY (copied per case)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def victim(self) -> Path:
        return self.tmp / "victim"

    def recipe(self, body: dict | str | bytes, name: str = "r.yaml") -> str:
        path = self.tmp / name
        if isinstance(body, dict):
            body = json.dumps(body)  # JSON is YAML
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        return str(path)

    def tiny(self, **stage_changes: object) -> dict:
        raw = json.loads(json.dumps(TINY))
        raw["data"]["root"] = str(self.fashion)
        raw["stages"][0].update(stage_changes)
        return raw

    def model_file(self, name: str = "m.safetensors", classes: int = 10,
                   dataset: str = "fashion_mnist", split: bool = True) -> str:
        spec = ModelSpec(arch="resnet_tiny", num_classes=classes, in_channels=1)
        torch.manual_seed(0)
        meta = {"dataset": dataset, "class_names": [str(i) for i in range(classes)],
                "image_size": 28, "in_channels": 1, "mean": [0.286], "std": [0.353]}
        if split:
            meta["split"] = {"val_size": 50, "seed": 0, "train_limit": 200}
        path = self.tmp / name
        save_model(build_model(spec), spec, path, meta=meta)
        return str(path)

    def run_copy(self) -> Path:
        """A copy of a finished run as ``out`` (a folder netshrink owns)."""
        import shutil

        shutil.copytree(self.trained_run, self.out)
        return self.out

    def tamper(self, edit: Callable[[dict], None]) -> Path:
        out = self.run_copy()
        record = json.loads((out / "run.json").read_text())
        edit(record)
        (out / "run.json").write_text(json.dumps(record))
        return out


def _victim_model(env: Env) -> None:
    env.victim.mkdir()
    (env.victim / "model.safetensors").write_bytes(b"the victim's own model")
    (env.victim / "notes.txt").write_text("keep me")


def _escape_name(env: Env) -> list[str]:
    _victim_model(env)
    raw = env.tiny(name="x/../../victim")
    return ["run", env.recipe(raw), "--out", str(env.out)]


def _slash_name(env: Env) -> list[str]:
    return ["run", env.recipe(env.tiny(name="a/b")), "--out", str(env.out)]


def _dot_name(env: Env) -> list[str]:
    return ["run", env.recipe(env.tiny(name="..")), "--out", str(env.out)]


def _hidden_name(env: Env) -> list[str]:
    return ["run", env.recipe(env.tiny(name=".hidden")), "--out", str(env.out)]


def _backslash_name(env: Env) -> list[str]:
    return ["run", env.recipe(env.tiny(name="a\\..\\b")), "--out", str(env.out)]


def _tampered_artifact(env: Env) -> list[str]:
    _victim_model(env)

    def edit(record: dict) -> None:
        record["stages"][1]["artifact"] = "../victim/model.safetensors"
    env.tamper(edit)
    return ["run", env.recipe(env.tiny()), "--out", str(env.out)]


def _absolute_artifact(env: Env) -> list[str]:
    _victim_model(env)

    def edit(record: dict) -> None:
        record["stages"][1]["artifact"] = str(env.victim / "model.safetensors")
    env.tamper(edit)
    return ["run", env.recipe(env.tiny()), "--out", str(env.out)]


def _artifact_outside_stages(env: Env) -> list[str]:
    def edit(record: dict) -> None:
        record["stages"][1]["artifact"] = "run.json"
    env.tamper(edit)
    return ["run", env.recipe(env.tiny()), "--out", str(env.out)]


def _tampered_stage_name(env: Env) -> list[str]:
    def edit(record: dict) -> None:
        record["stages"][1]["name"] = "../../victim"
    env.tamper(edit)
    return ["run", env.recipe(env.tiny()), "--out", str(env.out)]


def _tampered_folders(env: Env) -> list[str]:
    _victim_model(env)

    def edit(record: dict) -> None:
        record["folders"] = ["../../victim"]
    env.tamper(edit)
    return ["run", env.recipe(env.tiny()), "--out", str(env.out)]


def _run_json_garbage(env: Env) -> list[str]:
    out = env.run_copy()
    (out / "run.json").write_bytes(b"\xff\xfe not json")
    return ["run", env.recipe(env.tiny()), "--out", str(env.out)]


def _run_json_deep(env: Env) -> list[str]:
    out = env.run_copy()
    (out / "run.json").write_text("[" * 200_000 + "]" * 200_000)
    return ["run", env.recipe(env.tiny()), "--out", str(env.out)]


def _out_is_file(env: Env) -> list[str]:
    env.out.write_text("a file of the user's")
    return ["run", env.recipe(env.tiny()), "--out", str(env.out)]


def _out_is_users_folder(env: Env) -> list[str]:
    (env.out / "stages" / "my-experiments").mkdir(parents=True)
    (env.out / "stages" / "my-experiments" / "results.csv").write_text("a,b\n1,2\n")
    (env.out / "report.md").write_text("# my report")
    return ["run", env.recipe(env.tiny()), "--out", str(env.out)]


def _input_inside_out(env: Env) -> list[str]:
    out = env.run_copy()
    weights = out / "stages" / "01-train" / "model.safetensors"
    return ["prune", "--weights", str(weights), "--method", "magnitude", "--ratio", "0.5",
            "--data-dir", str(env.fashion), "--out", str(out)]


def _teacher_inside_out(env: Env) -> list[str]:
    out = env.run_copy()
    teacher = out / "stages" / "01-train" / "model.safetensors"
    return ["distill", "--teacher", str(teacher), "--arch", "resnet_tiny", "--epochs", "1",
            "--data-dir", str(env.fashion), "--out", str(out)]


def _missing_teacher(env: Env) -> list[str]:
    raw = env.tiny()
    raw["stages"].append({"kind": "finetune", "epochs": 1, "max_steps": 1,
                          "distill": {"teacher": str(env.tmp / "no-teacher.safetensors")}})
    return ["run", env.recipe(raw), "--out", str(env.out)]


def _garbage_teacher(env: Env) -> list[str]:
    bad = env.tmp / "teacher.safetensors"
    bad.write_bytes(os.urandom(300))
    raw = env.tiny()
    raw["stages"].append({"kind": "finetune", "epochs": 1, "max_steps": 1,
                          "distill": {"teacher": str(bad)}})
    return ["run", env.recipe(raw), "--out", str(env.out)]


def _teacher_wrong_classes(env: Env) -> list[str]:
    raw = env.tiny()
    raw["stages"].append({"kind": "finetune", "epochs": 1, "max_steps": 1,
                          "distill": {"teacher": env.model_file("t3.safetensors", classes=3)}})
    return ["run", env.recipe(raw), "--out", str(env.out)]


def _teacher_is_folder(env: Env) -> list[str]:
    (env.tmp / "teacher-dir").mkdir()
    return ["distill", "--teacher", str(env.tmp / "teacher-dir"), "--arch", "resnet_tiny",
            "--data-dir", str(env.fashion), "--out", str(env.out)]


def _late_bad_stage_file(env: Env) -> list[str]:
    # The bad file is named by the *last* stage: found before the first stage runs.
    raw = env.tiny()
    raw["stages"].append({"kind": "quant.ptq"})
    raw["stages"].append({"kind": "distill.kd", "epochs": 1, "max_steps": 1,
                          "student": {"arch": "resnet_tiny",
                                      "weights": str(env.tmp / "missing-student.pt")}})
    return ["run", env.recipe(raw), "--out", str(env.out)]


def _inf_lr(env: Env) -> list[str]:
    return ["run", env.recipe("".join(_tiny_yaml(env, "lr: .inf"))), "--out", str(env.out)]


def _nan_lr(env: Env) -> list[str]:
    return ["run", env.recipe("".join(_tiny_yaml(env, "lr: .nan"))), "--out", str(env.out)]


def _inf_warmup(env: Env) -> list[str]:
    return ["run", env.recipe("".join(_tiny_yaml(env, "warmup_epochs: .inf"))),
            "--out", str(env.out)]


def _inf_in_data(env: Env) -> list[str]:
    raw = env.tiny()
    raw["report"] = {"accuracy_budget": float("inf")}
    return ["run", env.recipe(json.dumps(raw).replace("Infinity", ".inf")),
            "--out", str(env.out)]


def _tiny_yaml(env: Env, extra: str) -> list[str]:
    return [f"name: tiny\nmodel: {{arch: resnet_tiny}}\n"
            f"data: {{name: fashion_mnist, root: {env.fashion}, val_size: 50}}\n"
            f"measure: {{latency: false}}\n"
            f"stages:\n  - {{kind: train, epochs: 1, max_steps: 2, {extra}}}\n"]


def _alias_bomb(env: Env) -> list[str]:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for level in range(1, 9):
        prev, cur = chr(ord("a") + level - 1), chr(ord("a") + level)
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]")
    lines.append("stages: [{kind: train, epochs: *i}]")
    return ["run", env.recipe("\n".join(lines)), "--out", str(env.out)]


def _deep_yaml(env: Env) -> list[str]:
    return ["run", env.recipe("stages: " + "[" * 5000 + "]" * 5000), "--out", str(env.out)]


def _non_utf8_recipe(env: Env) -> list[str]:
    return ["run", env.recipe(b"name: \xff\xfe\nstages: []\n"), "--out", str(env.out)]


def _huge_recipe(env: Env) -> list[str]:
    return ["run", env.recipe("# " + "x" * (2 << 20) + "\nstages: []\n"), "--out",
            str(env.out)]


def _recipe_is_folder(env: Env) -> list[str]:
    (env.tmp / "dir.yaml").mkdir()
    return ["run", str(env.tmp / "dir.yaml"), "--out", str(env.out)]


def _recipe_missing(env: Env) -> list[str]:
    return ["run", str(env.tmp / "nope.yaml"), "--out", str(env.out)]


def _recipe_not_mapping(env: Env) -> list[str]:
    return ["run", env.recipe("- just\n- a list\n"), "--out", str(env.out)]


def _recipe_fifo(env: Env) -> list[str]:
    os.mkfifo(env.tmp / "pipe.yaml")
    return ["run", str(env.tmp / "pipe.yaml"), "--out", str(env.out)]


def _unknown_stage(env: Env) -> list[str]:
    raw = env.tiny()
    raw["stages"].append({"kind": "prune.magic"})
    return ["run", env.recipe(raw), "--out", str(env.out)]


def _unknown_key(env: Env) -> list[str]:
    return ["run", env.recipe(env.tiny(learning_rate=0.1)), "--out", str(env.out)]


def _from_unknown(env: Env) -> list[str]:
    raw = env.tiny()
    raw["stages"].append({"kind": "finetune", "from": "nowhere", "epochs": 1})
    return ["run", env.recipe(raw), "--out", str(env.out)]


def _missing_weights(env: Env) -> list[str]:
    raw = env.tiny()
    raw["model"]["weights"] = str(env.tmp / "gone.safetensors")
    return ["run", env.recipe(raw), "--out", str(env.out)]


def _missing_data(env: Env) -> list[str]:
    raw = env.tiny()
    raw["data"]["root"] = str(env.tmp / "no-data")
    return ["run", env.recipe(raw), "--out", str(env.out)]


def _cache_nan(env: Env) -> list[str]:
    return ["cache", "prune", "--max-size", "nan"]


def _cache_inf(env: Env) -> list[str]:
    return ["cache", "prune", "--unused-days", "inf"]


def _cache_negative(env: Env) -> list[str]:
    return ["cache", "prune", "--max-size", "-1"]


def _garbage_onnx(env: Env) -> list[str]:
    (env.tmp / "m.onnx").write_bytes(os.urandom(500))
    return ["quantize", "--weights", str(env.tmp / "m.onnx"), "--method", "ptq",
            "--out", str(env.out)]


def _eval_val_unknown_split(env: Env) -> list[str]:
    return ["eval", "--weights", env.model_file(split=False), "--split", "val",
            "--data-dir", str(env.fashion)]


def _eval_val_other_dataset(env: Env) -> list[str]:
    return ["eval", "--weights", env.model_file(dataset="digits"), "--split", "val",
            "--data", "fashion_mnist", "--data-dir", str(env.fashion)]


def _eval_wrong_classes(env: Env) -> list[str]:
    return ["eval", "--weights", env.model_file(classes=3), "--data-dir", str(env.fashion)]


def edit_meta(weights: str, **changes: object) -> str:
    """The model file ``weights`` with keys of its ``meta`` changed (tensors kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(weights, "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    meta = json.loads(header["meta"])
    meta.update(changes)
    header["meta"] = json.dumps(meta)
    save_file(tensors, weights, metadata=header)
    return weights


def _eval_bad_split_meta(env: Env) -> list[str]:
    weights = edit_meta(env.model_file(), split={"val_size": -5, "seed": "x"})
    return ["eval", "--weights", weights, "--split", "val", "--data-dir", str(env.fashion)]


def _bad_image_in_val(env: Env) -> list[str]:
    from fixtures_data import write_image_folder

    written = write_image_folder(env.tmp / "images")
    bad = written["val"][-1][0]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated: found before anything is written
    raw = env.tiny()
    raw["model"]["stem"] = "cifar"
    raw["data"] = {"name": "imagefolder", "root": str(env.tmp / "images"), "image_size": 16,
                   "val_size": 0, "calib_size": 4, "num_workers": 0}
    return ["run", env.recipe(raw), "--out", str(env.out)]


def _report_not_a_run(env: Env) -> list[str]:
    env.out.mkdir()
    (env.out / "notes.txt").write_text("mine")
    return ["report", str(env.out)]


CASES: dict[str, Callable[[Env], list[str]]] = {
    "stage-name-escapes-with-dotdot": _escape_name,
    "stage-name-with-slash": _slash_name,
    "stage-name-dotdot": _dot_name,
    "stage-name-hidden": _hidden_name,
    "stage-name-backslashes": _backslash_name,
    "run-json-artifact-outside": _tampered_artifact,
    "run-json-artifact-absolute": _absolute_artifact,
    "run-json-artifact-not-in-a-stage": _artifact_outside_stages,
    "run-json-stage-name-escapes": _tampered_stage_name,
    "run-json-folders-escape": _tampered_folders,
    "run-json-not-json": _run_json_garbage,
    "run-json-200k-deep": _run_json_deep,
    "out-is-a-file": _out_is_file,
    "out-is-the-users-folder": _out_is_users_folder,
    "prune-input-inside-out": _input_inside_out,
    "distill-teacher-inside-out": _teacher_inside_out,
    "teacher-missing": _missing_teacher,
    "teacher-garbage": _garbage_teacher,
    "teacher-wrong-classes": _teacher_wrong_classes,
    "teacher-is-a-folder": _teacher_is_folder,
    "last-stage-names-a-missing-file": _late_bad_stage_file,
    "lr-inf": _inf_lr,
    "lr-nan": _nan_lr,
    "warmup-inf": _inf_warmup,
    "report-budget-inf": _inf_in_data,
    "yaml-alias-bomb": _alias_bomb,
    "yaml-5000-deep": _deep_yaml,
    "recipe-not-utf8": _non_utf8_recipe,
    "recipe-2mb": _huge_recipe,
    "recipe-is-a-folder": _recipe_is_folder,
    "recipe-missing": _recipe_missing,
    "recipe-not-a-mapping": _recipe_not_mapping,
    "recipe-named-pipe": _recipe_fifo,
    "stage-kind-unknown": _unknown_stage,
    "stage-key-unknown": _unknown_key,
    "from-unknown-stage": _from_unknown,
    "model-weights-missing": _missing_weights,
    "data-root-missing": _missing_data,
    "cache-prune-max-size-nan": _cache_nan,
    "cache-prune-unused-days-inf": _cache_inf,
    "cache-prune-negative": _cache_negative,
    "quantize-garbage-onnx": _garbage_onnx,
    "eval-val-without-recorded-split": _eval_val_unknown_split,
    "eval-val-on-another-dataset": _eval_val_other_dataset,
    "eval-wrong-class-count": _eval_wrong_classes,
    "eval-val-bad-split-metadata": _eval_bad_split_meta,
    "report-of-a-non-run-folder": _report_not_a_run,
    "image-folder-bad-image-in-val": _bad_image_in_val,
}


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: content hash (files), "dir", or link target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "special"
    return found




@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_refused_and_nothing_changes(
    case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, fashion_dir: Path,
    trained_run: Path,
) -> None:
    refuse_case(CASES[case], capsys, tmp_path, fashion_dir, trained_run)


def refuse_case(build: Callable[[Env], list[str]], capsys: pytest.CaptureFixture[str],
                tmp_path: Path, fashion_dir: Path, trained_run: Path) -> str:
    """Build a case in ``tmp_path/case`` and check it is refused with nothing changed;
    returns the error line."""
    env = Env(tmp_path / "case", fashion_dir, trained_run)
    env.tmp.mkdir()
    return assert_refused_untouched(build(env), capsys, tmp_path)


def assert_refused_untouched(argv: list[str], capsys: pytest.CaptureFixture[str],
                             root: Path) -> str:
    """``netshrink argv`` exits 2 with one ``netshrink: error:`` line, no traceback, and
    nothing under ``root`` written, moved or removed; returns that line."""
    capsys.readouterr()
    before = snapshot(root)
    code = main(argv)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("netshrink: error: "), err
    assert "Traceback" not in err and len(lines[0]) < 600, err
    assert snapshot(root) == before  # nothing written, moved or removed, anywhere
    return lines[0]


def test_the_table_covers_the_issue() -> None:
    assert len(CASES) >= 40
