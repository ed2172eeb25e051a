"""Hostile sizes and metadata that passed every earlier check (issue 23): recipes of
thousands of stages, run records nested deep, model files whose recorded split is
edited. Same rules as ``test_hostile_runs``: exit 2, one line, nothing changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from test_hostile_runs import (
    Env,
    _tiny_yaml,
    edit_meta,
    refuse_case,
)


def _many_stages(env: Env) -> list[str]:
    raw = env.tiny()
    raw["stages"] = [{"kind": "prune.nm"}] * 20_000  # 400 KB: within the size bound
    return ["run", env.recipe(json.dumps(raw, separators=(",", ":"))), "--out", str(env.out)]


def _huge_integer(env: Env) -> list[str]:
    text = "".join(_tiny_yaml(env, "seed: " + "9" * 5000))
    return ["run", env.recipe(text), "--out", str(env.out)]


def _deep_run_json_for_report(env: Env) -> list[str]:
    out = env.run_copy()
    record = (out / "run.json").read_text()
    (out / "run.json").write_text(record.replace('"config": {',
                                                 '"config": {"x": ' + "[" * 100_000
                                                 + "]" * 100_000 + ", ", 1))
    return ["report", str(out)]


def _huge_run_json_for_report(env: Env) -> list[str]:
    out = env.run_copy()
    with (out / "run.json").open("ab") as f:
        f.truncate(65 << 20)  # sparse: no disk spent
    return ["report", str(out)]


def _compress_split(**split: Any) -> Callable[[Env], list[str]]:
    """``compress`` on a model file whose recorded split was edited to ``split``."""
    def build(env: Env) -> list[str]:
        weights = edit_meta(env.model_file(), split=split)
        return ["compress", "--weights", weights, "--data-dir", str(env.fashion),
                "--out", str(env.out)]
    return build


def _model_image_size_past_the_bound(env: Env) -> list[str]:
    weights = edit_meta(env.model_file(), image_size=4096)  # data.image_size's bound: 2048
    return ["eval", "--weights", weights, "--data-dir", str(env.fashion)]


def _pth_persistent_id_not_a_tuple(env: Env) -> list[str]:
    # torch.load checks a record's persistent id with an assert: AssertionError escaped
    import io
    import pickle
    import zipfile

    import torch

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> int | None:
            return 5 if obj == "x" else None

    body = io.BytesIO()
    Pickler(body, protocol=2).dump({"w": "x"})
    good = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, good)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good.getvalue())) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, body.getvalue() if info.filename.endswith("data.pkl")
                         else src.read(info))
    path = env.tmp / "m.pth"
    path.write_bytes(out.getvalue())
    return ["eval", "--weights", str(path), "--data-dir", str(env.fashion)]


CASES: dict[str, Callable[[Env], list[str]]] = {
    "eval-pth-persistent-id-not-a-tuple": _pth_persistent_id_not_a_tuple,
    "eval-model-image-size-past-the-data-bound": _model_image_size_past_the_bound,
    "recipe-20000-stages": _many_stages,
    "recipe-integer-of-5000-digits": _huge_integer,
    "report-run-json-100k-deep": _deep_run_json_for_report,
    "report-run-json-65mb": _huge_run_json_for_report,
    "compress-split-seed-text": _compress_split(val_size=50, seed="x"),
    "compress-split-seed-beyond-uint64": _compress_split(val_size=50, seed=10**30),
    "compress-split-seed-list": _compress_split(val_size=50, seed=[1]),
    "compress-split-train-limit-text": _compress_split(val_size=50, seed=0,
                                                       train_limit="abc"),
    "compress-split-train-limit-float": _compress_split(val_size=50, seed=0,
                                                        train_limit=1.5e300),
    "compress-split-val-size-bool": _compress_split(val_size=True, seed=0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_sizes_and_metadata_are_refused(
    case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, fashion_dir: Path,
    trained_run: Path,
) -> None:
    refuse_case(CASES[case], capsys, tmp_path, fashion_dir, trained_run)


def test_a_training_batch_beyond_the_device_is_refused_before_the_run_writes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fashion_dir: Path,
    trained_run: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bound is the device's memory; set lower here, a tiny model's 64-image batch
    # (a few MB of activations kept for the backward) stands for a ResNet-50 at 512 px
    # and batch 256 (112 GB), which the machine's own memory refuses.
    monkeypatch.setenv("NETSHRINK_MAX_ACTIVATION_BYTES", str(1 << 20))

    def build(env: Env) -> list[str]:
        return ["run", env.recipe(env.tiny(batch_size=64)), "--out", str(env.out)]
    line = refuse_case(build, capsys, tmp_path, fashion_dir, trained_run)
    assert "stages[0] (train): batch_size: training at batch 64 would keep" in line


def test_a_stage_the_device_cannot_run_is_refused_before_the_run_writes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fashion_dir: Path,
    trained_run: Path,
) -> None:
    def build(env: Env) -> list[str]:
        raw = env.tiny()
        raw["stages"].append({"kind": "deploy.torch", "precision": "fp16"})
        return ["run", env.recipe(raw), "--out", str(env.out), "--device", "cpu"]
    line = refuse_case(build, capsys, tmp_path, fashion_dir, trained_run)
    assert "stages[1] (deploy.torch): precision fp16 computes on an NVIDIA GPU" in line


def test_a_deep_plot_list_is_not_ours_and_the_report_renders(
    tmp_path: Path, fashion_dir: Path, trained_run: Path,
) -> None:
    from netshrink.cli import main

    env = Env(tmp_path, fashion_dir, trained_run)
    out = env.run_copy()
    (out / "report_files").mkdir()
    (out / "report_files" / ".rendered.json").write_text("[" * 200_000)  # RecursionError
    (out / "report_files" / "mine.png").write_bytes(b"the user's plot")
    assert main(["report", str(out)]) == 0
    assert (out / "report_files" / "mine.png").read_bytes() == b"the user's plot"
    assert (out / "report.html").is_file()
